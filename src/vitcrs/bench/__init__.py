"""`python -m vitcrs.bench`: memory and speed of exact vs CRS / WTA-CRS training steps of a ViT.

Runs configurations (exact; CRS / WTA-CRS at several ratios and target sets; eager / sdpa attention; fp32 /
bf16 autocast; gradient checkpointing on / off) one after the other in one process on one synthetic batch,
and reports per configuration: saved-for-backward bytes (measured, and the analytic ideal), and on CUDA peak
allocated / reserved memory and images/s, each also as a ratio to the exact run of the same attention and
precision. Writes bench.json and bench.md. See docs/benchmarks.md.

    python -m vitcrs.bench --model vit_b16 --grid full                          # the GPU table
    python -m vitcrs.bench --model vit_tiny --layers 1 --image-size 64 --batch-size 2   # CPU, seconds
    python -m vitcrs.bench --model timm_micro --batch-size 8 --device cpu     # any family: a model config
    python -m vitcrs.bench --model vit_small_patch16_224 --grid full          # a timm model, random init
"""

from .analytic import (
    BlockShape,
    analytic_block_saved_bytes,
    ideal_model_saved_bytes,
    max_batch_from_estimate,
)
from .cli import main, parser
from .grid import BENCH_TARGET_SETS, GRIDS, BenchConfig, expand
from .measure import (
    MODELS,
    ModelSpec,
    architecture,
    block_shape,
    build,
    enable_checkpointing,
    measure_saved_bytes,
    measured_block_saved_bytes,
    model_saved_bytes,
)
from .render import markdown
from .runner import BenchOptions, fill_ratios, run_bench, run_config

__all__ = [
    "BENCH_TARGET_SETS",
    "GRIDS",
    "MODELS",
    "BenchConfig",
    "BenchOptions",
    "BlockShape",
    "ModelSpec",
    "analytic_block_saved_bytes",
    "architecture",
    "block_shape",
    "build",
    "enable_checkpointing",
    "expand",
    "fill_ratios",
    "ideal_model_saved_bytes",
    "main",
    "markdown",
    "max_batch_from_estimate",
    "measure_saved_bytes",
    "measured_block_saved_bytes",
    "model_saved_bytes",
    "parser",
    "run_bench",
    "run_config",
]
