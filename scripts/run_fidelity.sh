#!/usr/bin/env bash
# The gradient-fidelity grid of docs/fidelity.md: python -m vitcrs.fidelity on the ViT-Tiny/16 checkpoint and the
# real CIFAR-10 (the JPEG tree), at the start of fine-tuning and after exact warm-up steps.
#
#   scripts/run_fidelity.sh [overrides...]     # e.g. fidelity.draws=4   or   data.batch_size=16
#
# Grid: every target set x ratio x prob x method below, measured on the same batch of data.batch_size=32 images
# at 224 px (the checkpoint's size; data.image_size=... changes it). Writes <OUT>/start/ (fresh head) and
# <OUT>/warmup/ (after WARMUP_STEPS exact AdamW steps at optim.lr), each with fidelity.json, fidelity.md (the
# tables) and fidelity.png. ViT-Tiny at 224 px, batch 32, on 2 CPU cores: about 3-5 s per forward + backward;
# the passes are counted on the progress bar.
# Environment (all optional):
#   PYTHON         interpreter with vitcrs installed (default: .venv/bin/python if present, else python)
#   SHARED         folder with data/cifar10-jpeg.tar.xz and models/vit-tiny-patch16-224 (default: shared or ../shared)
#   DATA_ROOT      the extracted tree with train/<class>/ and test/<class>/ (default: data/cifar10-jpeg; extracted
#                  from $SHARED/data/cifar10-jpeg.tar.xz into data/ when missing)
#   MODEL          the checkpoint directory (default: $SHARED/models/vit-tiny-patch16-224)
#   OUT            the output folder (default: outputs/fidelity_tiny)
#   RATIOS         default "0.5 0.3 0.1"
#   TARGET_SETS    sets of vitcrs.crs.TARGET_SETS (study, qkv, matmuls, linears, all, lean, lean_all,
#                  lean_block); default "study matmuls qkv linears lean"
#   PROBS          default "norm norm_grad"
#   METHODS        default "wta_crs" (add crs to compare)
#   DRAWS          sampled gradients per configuration (default 8)
#   NOISE_BATCHES  batches of exact gradients for the minibatch noise (default 4)
#   PRIME_PASSES   sampled passes before the draws, prob=norm_grad / sample_cache only (default 3)
#   WARMUP_STEPS   exact AdamW steps before the second measurement (default 50; 0 skips it)
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/shared_inputs.sh  # PYTHON, SHARED, DATA_ROOT, MODEL (checked; the tree extracted)
OUT=${OUT:-outputs/fidelity_tiny}
RATIOS=${RATIOS:-0.5 0.3 0.1}
TARGET_SETS=${TARGET_SETS:-study matmuls qkv linears lean}
PROBS=${PROBS:-norm norm_grad}
METHODS=${METHODS:-wta_crs}
DRAWS=${DRAWS:-8}
NOISE_BATCHES=${NOISE_BATCHES:-4}
PRIME_PASSES=${PRIME_PASSES:-3}
WARMUP_STEPS=${WARMUP_STEPS:-50}

configs=""
for set in $TARGET_SETS; do
  for ratio in $RATIOS; do
    for prob in $PROBS; do
      for method in $METHODS; do
        configs+="{method: $method, targets: $set, ratio: $ratio, prob: $prob}, "
      done
    done
  done
done
configs="[${configs%, }]"

measure() {  # measure <out dir> <warm-up steps> [overrides...]
  local dir=$1 steps=$2
  shift 2
  HF_HUB_OFFLINE=1 "$PYTHON" -m vitcrs.fidelity model=vit_tiny model.name_or_path="$MODEL" \
    dataset=imagefolder data.root="$DATA_ROOT" data.batch_size=32 \
    "fidelity.configs=$configs" fidelity.draws="$DRAWS" fidelity.noise_batches="$NOISE_BATCHES" \
    fidelity.prime_passes="$PRIME_PASSES" fidelity.warmup_steps="$steps" hydra.run.dir="$dir" "$@"
}

measure "$OUT/start" 0 "$@"
if [ "$WARMUP_STEPS" -gt 0 ]; then
  measure "$OUT/warmup" "$WARMUP_STEPS" "$@"
fi
echo "tables: $OUT/start/fidelity.md${WARMUP_STEPS:+ and $OUT/warmup/fidelity.md}" >&2
