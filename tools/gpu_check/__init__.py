"""`python -m gpu_check OUT_DIR` (run by scripts/gpu_check.sh from the repository root): GPU evidence in one
command, within a time budget (9 minutes). A tool of this repository, not part of the vitcrs package.

Steps, each with a time limit, each writing its results into OUT_DIR as soon as it ends:

1. `tests`: the test suite's device tests on the GPU (`pytest --device cuda -m "device or cuda"`: exact
   forwards, exact gradients at ratio 1 and unbiased sampled gradients of every op, target set and model
   family, in fp32 and bf16 autocast); if they fail the check stops there;
2. `python -m vitcrs.bench` on ViT-B/16 batch 64: exact, each sound target set at ratios 0.5 and 0.3,
   checkpointing alone and with CRS, eager fp32 and sdpa bf16 (one process each);
3. `python -m vitcrs.train experiment=study_tiny` on the real CIFAR-10 with the ViT-Tiny from the payload for
   as many (configuration, seed) pairs as fit (exact, the default sampling, the study's targets at 0.3), then
   `python -m vitcrs.report`, and `python -m vitcrs.fidelity`.

`--dry-run` runs every step on the CPU at tiny shapes with a generated payload (the tests step collects the
device tests without running them: the suite itself runs them on the CPU). See docs/gpu.md.
"""

from .cli import main, parser

__all__ = ["main", "parser"]
