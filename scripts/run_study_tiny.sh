#!/usr/bin/env bash
# experiment=study_tiny on the real CIFAR-10 (the JPEG tree) with the ViT-Tiny/16 checkpoint, then the report.
#
#   scripts/run_study_tiny.sh [overrides...]     # e.g. seed=0,1,2   or   crs.ratio=1.0   or   trainer.max_epochs=1
#
# Each job writes <OUT>/<dataset>_r<ratio>_s<seed>/ (a rerun of the same cell replaces it), so the grid can be
# run in pieces (one ratio or seed per call) and one report covers all of them: <OUT>/report/.
# Environment (all optional):
#   PYTHON     interpreter with vitcrs installed (default: .venv/bin/python if present, else python)
#   SHARED     folder with data/cifar10-jpeg.tar.xz and models/vit-tiny-patch16-224 (default: shared or ../shared)
#   DATA_ROOT  the extracted tree with train/<class>/ and test/<class>/ (default: data/cifar10-jpeg; extracted
#              from $SHARED/data/cifar10-jpeg.tar.xz into data/ when missing)
#   MODEL      the checkpoint directory (default: $SHARED/models/vit-tiny-patch16-224)
#   OUT        the sweep folder (default: outputs/study_tiny)
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/shared_inputs.sh  # PYTHON, SHARED, DATA_ROOT, MODEL (checked; the tree extracted)
OUT=${OUT:-outputs/study_tiny}

HF_HUB_OFFLINE=1 "$PYTHON" -m vitcrs.train -m experiment=study_tiny \
  model.name_or_path="$MODEL" dataset=imagefolder data.root="$DATA_ROOT" data.name=cifar10 \
  hydra.sweep.dir="$OUT" 'hydra.sweep.subdir=${data.name}_r${crs.ratio}_s${seed}' "$@"
"$PYTHON" -m vitcrs.report "$OUT" --out "$OUT/report"
