"""Where sampled ops get their output-gradient norms from: `GradNormEMA` (`prob="norm_grad"`).

A sampled op asks its source for a `visit()` in forward and keeps it for its backward:
- `visit.exact`: compute this op's weight gradient exactly (keep all rows) this time;
- `visit.weights(norms)`: an estimate (>= 0; the op floors it, `floored`) of ‖output gradient‖
  broadcastable to the op's row norms `norms` [*lead, n] (lead: batch (and head) dims, n: positions), or
  None (then p ∝ ‖row‖ alone);
- `visit.update(norms)`: this backward's ‖output gradient‖ per row, `norms` [*lead, n].
A visit of None means: p ∝ ‖row‖, nothing recorded. `vitcrs.crs.sample_cache` is the per-image source.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Estimates are floored to FLOOR x their mean over the rows sampled together (plus TINY), so every row with a
# non-zero input keeps p > 0: a row whose gradient was 0 last time may not be 0 now, and unbiasedness needs
# p > 0 wherever g xᵀ ≠ 0. Such rows are drawn rarely, with a large scale.
FLOOR = 1e-3
TINY = 1e-12


def floored(est: Tensor, joint: bool = False) -> Tensor:
    """`est` [..., n] >= 0 plus FLOOR x its mean plus TINY: strictly positive. The mean runs over the last
    dim (rows sampled per slice, as in a matmul), or over everything with `joint` (rows sampled together
    across images, as in a linear)."""
    mean = est.mean() if joint else est.mean(-1, keepdim=True)
    return est + FLOOR * mean + TINY


class GradNormEMA(nn.Module):
    """Per-position running mean of ‖output gradient‖, updated from each backward pass.

    Positions are token positions (the second-to-last dim of a linear's input) or contraction indices of a
    matmul; the mean runs over the batch (and heads) and over steps (momentum). `estimate` [n] is a
    non-persistent buffer (it moves with `.to()`, stays out of `state_dict`), empty before the first update.
    `weights` returns it (the op floors it: `floored`), or None while it is empty or when the length changed:
    then p ∝ ‖row‖ with its proper 1/(k·p) scale, which is unbiased too.
    """

    exact = False

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("estimate", torch.empty(0), persistent=False)

    def visit(self) -> GradNormEMA:
        """The same estimate serves every batch."""
        return self

    @torch.no_grad()
    def update(self, norms: Tensor) -> None:
        """Fold in this step's gradient norms `norms` [*lead, n], averaged over the lead dims. A step with a
        non-finite norm (an overflow that a GradScaler skips) is left out (on the device, no host sync): it
        would stay in the estimate for good."""
        norms = norms.detach().float()
        if norms.dim() > 1:
            norms = norms.mean(tuple(range(norms.dim() - 1)))
        finite = torch.isfinite(norms).all()
        if self.estimate.shape != norms.shape:  # first step, or new token count
            self.estimate = torch.where(finite, norms, torch.zeros_like(norms))  # zeros: p ∝ ‖row‖ (floored)
            return
        update = self.estimate * self.momentum + norms * (1.0 - self.momentum)
        self.estimate = torch.where(finite, update, self.estimate)

    def weights(self, norms: Tensor) -> Tensor | None:
        """The estimate [n] for row norms `norms` [..., n], or None."""
        return self.estimate if self.estimate.numel() == norms.shape[-1] else None
