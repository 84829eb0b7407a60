#!/usr/bin/env bash
# Download the wheels that a stock PyTorch GPU image lacks (for scripts/gpu_check.sh on a machine with no network).
#
#   scripts/gpu_wheels.sh [PAYLOAD_DIR]      # default .carry (git-ignored); the wheels go to PAYLOAD_DIR/wheels
#
# Which packages: vitcrs's dependencies (pyproject.toml) and theirs that such an image does not hold. The
# workplace's CUDA image (Python 3.12, torch, transformers, lightning,
# torchmetrics, tensorboard, rich, matplotlib, safetensors, pyyaml, packaging, pytest, pytest-timeout) lacks
# hydra-core, omegaconf and omegaconf's antlr4-python3-runtime. The versions are the ones this checkout's
# environment has installed (PYTHON), else the newest that pyproject.toml allows. Wheels are for Python 3.12,
# manylinux x86_64 (the three are pure Python); antlr4-python3-runtime 4.9.3 is published as an sdist only, so
# its wheel is built here. scripts/gpu_check.sh installs them with `pip install --no-index --find-links`.
# Environment: PYTHON (interpreter with pip; default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PAYLOAD=${1:-.carry}
WHEELS=$PAYLOAD/wheels
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

# distribution name, and the version spec when PYTHON has none installed (pyproject.toml's ranges)
declare -A FALLBACK=(
  [hydra-core]='>=1.3,<1.4'
  [omegaconf]='>=2.3,<2.4'
  [antlr4-python3-runtime]='==4.9.*'
)
spec() {  # NAME -> NAME==<installed version> or NAME<fallback range>
  local v
  v=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null) \
    && echo "$1==$v" || echo "$1${FALLBACK[$1]}"
}

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  PLATFORMS+=(--platform "$p")
done
for name in hydra-core omegaconf; do
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    "${PLATFORMS[@]}" -d "$WHEELS" "$(spec "$name")"
done
# sdist only on PyPI: build a (pure-Python, py3-none-any) wheel from it
"$PYTHON" -m pip wheel -q --no-deps -w "$WHEELS" "$(spec antlr4-python3-runtime)"

for w in "$WHEELS"/*.whl; do
  case "$(basename "$w")" in
    *-py3-none-any.whl | *-py2.py3-none-any.whl | *-cp312-*manylinux*x86_64*.whl) ;;
    *) echo "error: $w is not a wheel for Python 3.12 on manylinux x86_64" >&2; exit 1 ;;
  esac
done
ls -l "$WHEELS"
du -sh "$WHEELS"
