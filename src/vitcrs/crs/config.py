"""`CRSConfig`: how backward passes are sampled."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

METHODS = ("crs", "wta_crs")
PROBS = ("norm", "norm_grad")


@dataclass(frozen=True)
class CRSConfig:
    """Settings of the column-row sampled backward pass.

    ratio: fraction of column-row pairs kept for backward, in (0, 1]; 1 is the exact op, with no sampling.
    method: "crs" (i.i.d. draws, p ∝ norm) or "wta_crs" (top-c rows kept deterministically, the rest drawn).
    min_k: never keep fewer than this many pairs (k = max(min_k, ceil(ratio · n)), capped at n).
    prob: sampling probabilities: "norm" (p ∝ ‖row‖) or "norm_grad" (‖row‖ times a running estimate of the
        output-gradient norm per position, kept from earlier backward passes).
    grad_ema: momentum of that running estimate, in [0, 1).
    """

    ratio: float = 1.0
    method: str = "wta_crs"
    min_k: int = 1
    prob: str = "norm"
    grad_ema: float = 0.9

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

    @property
    def exact(self) -> bool:
        return float(self.ratio) >= 1.0

    def num_samples(self, n: int) -> int:
        """k for a contraction of length n: max(min_k, ceil(ratio · n)), at most n."""
        return min(n, max(self.min_k, math.ceil(float(self.ratio) * n - 1e-9)))

    def to_dict(self) -> dict:
        return asdict(self)
