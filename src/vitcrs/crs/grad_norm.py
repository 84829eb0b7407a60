"""`GradNormEMA`: a running estimate of the output-gradient norm per position, for `prob="norm_grad"`."""

from __future__ import annotations

import torch
from torch import Tensor


class GradNormEMA:
    """Per-position running mean of ‖output gradient‖, updated from each backward pass.

    Positions are token positions (the second-to-last dim of a linear's input) or contraction indices of a
    matmul. `weights(length)` returns the estimate floored to stay positive (so sampling stays unbiased), or
    None before the first update or when the length changed.
    """

    def __init__(self, momentum: float = 0.9) -> None:
        self.momentum = momentum
        self.value: Tensor | None = None

    @torch.no_grad()
    def update(self, norms: Tensor) -> None:
        """Fold in this step's mean gradient norm per position, `norms` [length]."""
        norms = norms.detach().float()
        if self.value is None or self.value.shape != norms.shape:  # first step, or new token count
            self.value = norms.clone()
            return
        if self.value.device != norms.device:  # e.g. restored from a checkpoint on another device
            self.value = self.value.to(norms.device)
        self.value.mul_(self.momentum).add_(norms, alpha=1.0 - self.momentum)

    def weights(self, length: int) -> Tensor | None:
        if self.value is None or self.value.numel() != length:
            return None
        return self.value + 1e-3 * self.value.mean() + 1e-12

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.momentum = state["momentum"]
        self.value = state["value"]
