# Sourced by scripts/run_study_tiny.sh and scripts/run_fidelity.sh (from the repository root): the interpreter,
# the real CIFAR-10 JPEG tree and the ViT-Tiny checkpoint, with the same environment variables:
#   PYTHON     interpreter with vitcrs installed (default: .venv/bin/python if present, else python)
#   SHARED     folder with data/cifar10-jpeg.tar.xz and models/vit-tiny-patch16-224 (default: shared or ../shared)
#   DATA_ROOT  the extracted tree with train/<class>/ and test/<class>/ (default: data/cifar10-jpeg; extracted
#              from $SHARED/data/cifar10-jpeg.tar.xz into data/ when missing)
#   MODEL      the checkpoint directory (default: $SHARED/models/vit-tiny-patch16-224)
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
if [ -z "${SHARED:-}" ]; then
  for candidate in shared ../shared; do
    if [ -d "$candidate" ]; then SHARED=$candidate; break; fi
  done
fi
SHARED=${SHARED:-shared}
DATA_ROOT=${DATA_ROOT:-data/cifar10-jpeg}
MODEL=${MODEL:-$SHARED/models/vit-tiny-patch16-224}

if [ ! -d "$DATA_ROOT/train" ]; then
  archive=$SHARED/data/cifar10-jpeg.tar.xz
  if [ "$DATA_ROOT" != data/cifar10-jpeg ] || [ ! -f "$archive" ]; then
    echo "error: no CIFAR-10 JPEG tree at $DATA_ROOT (and no $archive to extract); set DATA_ROOT" >&2
    exit 2
  fi
  echo "extracting $archive into data/" >&2
  mkdir -p data
  tar -xJf "$archive" -C data
fi
if [ ! -f "$MODEL/config.json" ]; then
  echo "error: no checkpoint at $MODEL (config.json missing); set MODEL" >&2
  exit 2
fi
