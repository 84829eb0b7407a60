"""Analytic saved-for-backward bytes: one ViT block (eager or sdpa attention) and the whole-model ideal.

`vitcrs.crs.vit_block_saved_bytes` models an eager block. With sdpa attention (measured on CPU, and consistent
with the external H100 reference figures in shared/docs/anchors.md) the block saves q, k, v, the attention
output and a float32 logsumexp instead of the scores' inputs, the softmax output P and P's autocast copy:

    sdpa = eager − P (fp32) − P's autocast copy + logsumexp (fp32, [batch, heads, tokens])
           + the attention output when "attn_output" is sampled

The lean block ("lean_block") keeps only the residual stream with either attention, so its two models agree.
The last term: sdpa returns its output already in the [batch, tokens, heads, head_dim] layout, so the
attention-output linear's input *is* sdpa's saved output; sampling that linear cannot free it and only adds
the sampled rows. The CUDA memory-efficient kernel (fp32) pads the logsumexp to a multiple of 32 tokens, a
difference below 0.1 % of a block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from vitcrs.crs import MATMUL_TARGETS, CRSConfig, vit_block_saved_bytes


@dataclass(frozen=True)
class BlockShape:
    """Shape of the encoder blocks of a ViT at one batch size."""

    batch: int
    tokens: int
    hidden: int
    heads: int
    intermediate: int
    layers: int

    def with_batch(self, batch: int) -> BlockShape:
        return BlockShape(batch, self.tokens, self.hidden, self.heads, self.intermediate, self.layers)

    def to_dict(self) -> dict:
        return asdict(self)


def _sampled(cfg: CRSConfig | None) -> bool:
    return cfg is not None and not cfg.exact


def _sdpa_block_saved_bytes(
    shape: BlockShape, cfg: CRSConfig | None, targets: tuple[str, ...], autocast: bool, checkpointing: bool
) -> int:
    """Analytic bytes one HF ViT encoder block with sdpa attention saves for backward (no dropout): the
    eager model adjusted as the module docstring says; the matmul targets do not exist with sdpa."""
    if _sampled(cfg) and set(targets) & set(MATMUL_TARGETS):
        raise ValueError(f"targets {sorted(set(targets) & set(MATMUL_TARGETS))} need eager attention")
    eager = _eager_block_saved_bytes(shape, cfg, targets, autocast, checkpointing)
    if _sampled(cfg) and "lean_block" in targets:  # keeps only the residual stream, whatever the attention
        return eager
    if checkpointing:  # a checkpointed plain block keeps only its input, whatever the attention
        return eager
    c = 2 if autocast else 4
    slices, tokens = shape.batch * shape.heads, shape.tokens
    probs = slices * tokens * tokens * 4
    probs_cast = slices * tokens * tokens * c if autocast else 0
    logsumexp = slices * tokens * 4
    kept_output = shape.batch * tokens * shape.hidden * c if _sampled(cfg) and "attn_output" in targets else 0
    return eager - probs - probs_cast + logsumexp + kept_output


def analytic_block_saved_bytes(
    shape: BlockShape,
    attn: str,
    autocast: bool,
    cfg: CRSConfig | None = None,
    targets: Iterable[str] = (),
    checkpointing: bool = False,
) -> int:
    """Analytic bytes one block of `shape` saves, for attention "eager" or "sdpa", exact or sampled
    (`checkpointing`: modelled for the "lean_block" target only, see `vit_block_saved_bytes`)."""
    if attn not in ("eager", "sdpa"):
        raise ValueError(f"no analytic model for attention {attn!r}: only eager and sdpa")
    model = _eager_block_saved_bytes if attn == "eager" else _sdpa_block_saved_bytes
    return model(shape, cfg, tuple(targets), autocast, checkpointing)


def _eager_block_saved_bytes(
    shape: BlockShape, cfg: CRSConfig | None, targets: tuple[str, ...], autocast: bool, checkpointing: bool
) -> int:
    s = shape
    return vit_block_saved_bytes(
        s.batch, s.tokens, s.hidden, s.heads, s.intermediate, cfg, targets, autocast, checkpointing
    )


def ideal_model_saved_bytes(
    measured_exact: int,
    shape: BlockShape,
    attn: str,
    autocast: bool,
    cfg: CRSConfig | None,
    targets: Iterable[str],
    checkpointing: bool = False,
) -> int:
    """Whole-model ideal: measured exact bytes minus, per block, what the analytic model says sampling saves.

    Everything outside the blocks (patch embedding, final LayerNorm, classifier, loss) is taken as measured.
    """
    exact_block = analytic_block_saved_bytes(shape, attn, autocast)
    sampled_block = analytic_block_saved_bytes(shape, attn, autocast, cfg, targets, checkpointing)
    return measured_exact - shape.layers * (exact_block - sampled_block)


def largest_fitting(fits: Callable[[int], bool], start: int, cap: int) -> int:
    """The largest batch b ≥ 0 with fits(b) (monotone in b): doubling from `start` while b ≤ `cap`, then
    bisection; 0 when `start` does not fit and no smaller batch does either."""
    lo, hi = 0, max(1, start)
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    if hi > cap:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def max_batch_from_estimate(estimate: Callable[[int], int], budget_bytes: int, upper: int = 1 << 20) -> int:
    """The largest batch b ≥ 0 with estimate(b) ≤ budget (estimate non-decreasing in b), by bisection."""
    return largest_fitting(lambda b: estimate(b) <= budget_bytes, 1, upper)
