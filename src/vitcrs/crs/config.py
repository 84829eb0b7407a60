"""`CRSConfig`: how backward passes are sampled."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

METHODS = ("crs", "wta_crs")
PROBS = ("norm", "norm_grad", "sample_cache")
GRAD_PROBS = ("norm_grad", "sample_cache")  # the probabilities that use output-gradient norms
CACHE_FORMATS = ("bfloat16", "uint8")
CACHE_WARMUPS = ("norm", "exact")


@dataclass(frozen=True)
class CRSConfig:
    """Settings of the column-row sampled backward pass; the defaults of the `crs.*` config keys.

    ratio: fraction of column-row pairs kept for backward, in (0, 1]; 1 is the exact op, with no sampling.
    method: "crs" (i.i.d. draws, p ∝ norm) or "wta_crs" (top-c rows kept deterministically, the rest drawn).
    min_k: never keep fewer than this many pairs (k = max(min_k, ceil(ratio · n)), capped at n).
    prob: sampling probabilities: "norm" (p ∝ ‖row‖), "norm_grad" (‖row‖ times a running estimate of the
        output-gradient norm per position, averaged over the batches of earlier backward passes), or
        "sample_cache" (the study's: ‖row‖ times the same image's output-gradient norm at that row, per token,
        or per head and position for the attention matmuls, cached in host memory from the image's previous
        training visit; `vitcrs.crs.sample_cache`). Until a gradient estimate exists, p ∝ ‖row‖ with its
        proper 1/(k·p) scale: every choice is unbiased from the first step. The "mlp" and "lean_block" targets
        draw with p ∝ ‖g‖·‖x‖ (the output gradient is known in their backward) whatever this says.
    grad_ema: momentum of the running estimate (norm_grad; sample_cache's stand-in for images without an
        entry), in [0, 1).
    cache_format: sample_cache's entries: "bfloat16" or "uint8" (a log-scale code in ±9 % steps: half the
        host memory).
    cache_warmup: sample_cache for images without an entry: "norm" (p ∝ ‖row‖ times the stand-in, the
        running mean of the entries written) or "exact" (the first training epoch runs the sampled ops
        exactly, keeping all rows, while the cache fills).
    cache_in_checkpoint: checkpoints also hold every rank's cache entries (GBs for a large training set), so
        a resumed run samples exactly as an unbroken one; False: a resumed run starts with an empty cache
        (its stand-in is kept), unbiased, but drawing other rows than the unbroken run.
    """

    ratio: float = 1.0
    method: str = "wta_crs"
    min_k: int = 1
    prob: str = "norm"
    grad_ema: float = 0.9
    cache_format: str = "bfloat16"
    cache_warmup: str = "norm"
    cache_in_checkpoint: bool = False

    def __post_init__(self) -> None:
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < float(r) <= 1.0):
            raise ValueError(
                f"crs.ratio={r!r} is invalid: it must be a number in (0, 1], e.g. crs.ratio=0.3."
            )
        if self.method not in METHODS:
            raise ValueError(f"crs.method={self.method!r} is unknown: choose one of {', '.join(METHODS)}.")
        if isinstance(self.min_k, bool) or not isinstance(self.min_k, int) or self.min_k < 1:
            raise ValueError(f"crs.min_k={self.min_k!r} is invalid: it must be an integer >= 1.")
        if self.prob not in PROBS:
            raise ValueError(f"crs.prob={self.prob!r} is unknown: choose one of {', '.join(PROBS)}.")
        if not isinstance(self.grad_ema, (int, float)) or not (0.0 <= self.grad_ema < 1.0):
            raise ValueError(f"crs.grad_ema={self.grad_ema!r} is invalid: it must be a number in [0, 1).")
        if self.cache_format not in CACHE_FORMATS:
            allowed = ", ".join(CACHE_FORMATS)
            raise ValueError(f"crs.cache_format={self.cache_format!r} is unknown: choose one of {allowed}.")
        if self.cache_warmup not in CACHE_WARMUPS:
            allowed = ", ".join(CACHE_WARMUPS)
            raise ValueError(f"crs.cache_warmup={self.cache_warmup!r} is unknown: choose one of {allowed}.")
        if not isinstance(self.cache_in_checkpoint, bool):
            value = self.cache_in_checkpoint
            raise ValueError(f"crs.cache_in_checkpoint={value!r} is invalid: it must be true or false.")

    @property
    def exact(self) -> bool:
        return float(self.ratio) >= 1.0

    def num_samples(self, n: int) -> int:
        """k for a contraction of length n: max(min_k, ceil(ratio · n)), at most n."""
        return min(n, max(self.min_k, math.ceil(float(self.ratio) * n - 1e-9)))

    def to_dict(self) -> dict:
        return asdict(self)
