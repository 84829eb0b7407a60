"""`python -m vitcrs.gpu_check OUT_DIR`: GPU evidence in one command, within a time budget (9 minutes).

Steps, each with a time limit, each writing its results into OUT_DIR as soon as it ends:

1. `pytest -m cuda` (the CUDA variants of the test suite) and a correctness smoke of every bench target set
   on the GPU in fp32 and bf16 autocast (`vitcrs.gpu_check.smoke`); if either fails the check stops there;
2. `python -m vitcrs.bench` on ViT-B/16 batch 64: exact, each sound target set at ratios 0.5 and 0.3,
   checkpointing alone and with CRS, eager fp32 and sdpa bf16 (one process each);
3. `python -m vitcrs.train experiment=study_tiny` on the real CIFAR-10 with the ViT-Tiny from the payload for
   as many (configuration, seed) pairs as fit (exact, the default sampling, the study's targets at 0.3), then
   `python -m vitcrs.report`; `python -m vitcrs.fidelity` too where it exists.

`--dry-run` runs every step on the CPU at tiny shapes with a generated payload. See docs/gpu.md.
"""

from .cli import main, parser

__all__ = ["main", "parser"]
