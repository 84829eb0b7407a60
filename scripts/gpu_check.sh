#!/usr/bin/env bash
# GPU evidence in one command (docs/gpu.md): the test suite's device tests on the GPU, the headline bench rows,
# study_tiny training on the real CIFAR-10, its report and the fidelity meter, within 9 minutes; results in OUT_DIR
# as each step ends.
#
#   bash scripts/gpu_check.sh OUT_DIR [--bundle DIR] [more options: bash scripts/gpu_check.sh x --help]
#   bash scripts/gpu_check.sh OUT_DIR --dry-run          # the same steps on the CPU at tiny shapes (CI runs it)
#
# Needs the payload of scripts/gpu_payload.sh (wheels, CIFAR-10 archive, ViT-Tiny; default .carry). Whatever of
# hydra-core, omegaconf and antlr4-python3-runtime the interpreter lacks is installed from the payload's wheels
# without network into SITE; vitcrs itself runs from this checkout (src/ on PYTHONPATH, conf/ beside it, as an
# editable install without dependencies would), so nothing of the machine's Python is changed. The check is
# tools/gpu_check (tools/ and tests/ on PYTHONPATH: it runs commands with the tests' runner).
# Environment: PYTHON (default .venv/bin/python if present, else python3), PAYLOAD (default <repo>/.carry),
#              SITE (default ${TMPDIR:-/tmp}/vitcrs_gpu_site).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash scripts/gpu_check.sh OUT_DIR [options: bash scripts/gpu_check.sh x --help]" >&2
  exit 2
fi
PYTHON=${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
PAYLOAD=${PAYLOAD:-$REPO/.carry}
SITE=${SITE:-${TMPDIR:-/tmp}/vitcrs_gpu_site}

missing=()
for pair in hydra:hydra-core omegaconf:omegaconf antlr4:antlr4-python3-runtime; do
  "$PYTHON" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ ! -d "$PAYLOAD/wheels" ]; then
    echo "error: $PYTHON lacks ${missing[*]} and $PAYLOAD/wheels does not exist: run scripts/gpu_payload.sh" >&2
    exit 2
  fi
  echo "installing ${missing[*]} from $PAYLOAD/wheels into $SITE (no network)"
  "$PYTHON" -m pip install -q --no-index --find-links "$PAYLOAD/wheels" --no-deps --no-compile --upgrade \
    --target "$SITE" "${missing[@]}"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO/src:$REPO/tests:$REPO/tools${PYTHONPATH:+:$PYTHONPATH}
exec "$PYTHON" -m gpu_check --payload "$PAYLOAD" "$@"
