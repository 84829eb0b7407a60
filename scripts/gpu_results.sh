#!/usr/bin/env bash
# Copy what is worth committing from a GPU check (scripts/gpu_check.sh) into docs/results/gpu/<date>_<gpu>/.
#
#   scripts/gpu_results.sh OUT_DIR_OR_BUNDLE [DEST]
#
# OUT_DIR_OR_BUNDLE: the check's OUT_DIR, or the folder its --bundle wrote (gpu_check.tar.gz is unpacked).
# Copied: summary.md/.json, gpu_check.log, env.json, nvidia-smi.txt, tests/junit.xml, bench/ (bench.md and each
# run's bench.json/.md), report/, and per training run metrics.json and .hydra/overrides.yaml (runs/<run>/).
# Not copied: checkpoints, TensorBoard/CSV logs, each command's full log (logs/).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:?usage: scripts/gpu_results.sh OUT_DIR_OR_BUNDLE [DEST]}
unpacked=""
trap '[ -z "$unpacked" ] || rm -rf "$unpacked"' EXIT
if [ -f "$SRC/gpu_check.tar.gz" ]; then
  unpacked=$(mktemp -d)
  tar -xzf "$SRC/gpu_check.tar.gz" -C "$unpacked"
  SRC=$(find "$unpacked" -mindepth 1 -maxdepth 1 -type d | head -1)
fi
[ -f "$SRC/summary.json" ] || { echo "error: no summary.json in $SRC: not a GPU check's output" >&2; exit 2; }
gpu=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1])).get('gpu','cpu'))" "$SRC/env.json" \
  | tr -c 'A-Za-z0-9.\n-' '_' | sed 's/__*/_/g; s/_$//')
day=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['meta']['started'][:10])" "$SRC/summary.json")
DEST=${2:-docs/results/gpu/${day}_${gpu}}
mkdir -p "$DEST"
for f in summary.md summary.json gpu_check.log env.json nvidia-smi.txt tests/junit.xml; do
  if [ -f "$SRC/$f" ]; then mkdir -p "$DEST/$(dirname "$f")"; cp "$SRC/$f" "$DEST/$f"; fi
done
for d in bench report; do
  if [ -d "$SRC/$d" ]; then rm -rf "${DEST:?}/$d"; cp -r "$SRC/$d" "$DEST/$d"; fi
done
for m in "$SRC"/train/*/metrics.json; do
  [ -f "$m" ] || continue
  run=$(basename "$(dirname "$m")")
  mkdir -p "$DEST/runs/$run"
  cp "$m" "$DEST/runs/$run/"
  [ -f "$(dirname "$m")/.hydra/overrides.yaml" ] && cp "$(dirname "$m")/.hydra/overrides.yaml" "$DEST/runs/$run/"
done
echo "$DEST"
