#!/usr/bin/env bash
# Lay out everything scripts/gpu_check.sh needs on a GPU machine with no network, in one git-ignored folder:
#
#   scripts/gpu_payload.sh [PAYLOAD_DIR]     # default .carry
#
#   PAYLOAD_DIR/wheels/                        hydra-core, omegaconf, antlr4-python3-runtime (scripts/gpu_wheels.sh)
#   PAYLOAD_DIR/data/cifar10-jpeg.tar.xz       the real CIFAR-10 as JPEGs (as is; extracted on the GPU machine)
#   PAYLOAD_DIR/models/vit-tiny-patch16-224/   the ImageNet ViT-Tiny/16 checkpoint
#
# and prints the payload's size and that of the whole working tree that travels with it (tracked and
# untracked-not-ignored files + the payload), which must stay under the device tool's 64 MiB.
# Environment: SHARED (folder with data/ and models/; default shared or ../shared), PYTHON (see gpu_wheels.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PAYLOAD=${1:-.carry}
if [ -z "${SHARED:-}" ]; then
  for candidate in shared ../shared; do
    if [ -d "$candidate/models" ]; then SHARED=$candidate; break; fi
  done
fi
SHARED=${SHARED:?set SHARED to the folder holding data/cifar10-jpeg.tar.xz and models/vit-tiny-patch16-224}
archive=$SHARED/data/cifar10-jpeg.tar.xz
model=$SHARED/models/vit-tiny-patch16-224
for need in "$archive" "$model/config.json" "$model/model.safetensors"; do
  [ -f "$need" ] || { echo "error: $need is missing (SHARED=$SHARED)" >&2; exit 2; }
done
if ! git check-ignore -q "$PAYLOAD/x"; then
  echo "error: $PAYLOAD is not git-ignored; it would travel twice (add it to .gitignore)" >&2
  exit 2
fi

scripts/gpu_wheels.sh "$PAYLOAD" >/dev/null
mkdir -p "$PAYLOAD/data" "$PAYLOAD/models"
cp "$archive" "$PAYLOAD/data/"
rm -rf "$PAYLOAD/models/vit-tiny-patch16-224"
cp -r "$model" "$PAYLOAD/models/"
chmod -R u+w "$PAYLOAD"

mib() { awk '{ s += $1 } END { printf "%.1f MiB", s / 1048576 }'; }
payload=$(find "$PAYLOAD" -type f -printf '%s\n' | mib)
tree=$( { git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null; \
          find "$PAYLOAD" -type f -printf '%s\n'; } | mib)
du -ah "$PAYLOAD" | sort -k2
echo "payload $PAYLOAD: $payload; working tree + payload: $tree (device tool limit: 64 MiB)"
