"""`SamplingBudget`: one sampling budget split over the weight gradients of every lean block
(`crs.budget="split"`).

Each product j (a linear's weight gradient gᵀx over the n rows of a batch) costs c_j = d_in · d_out per kept
row, and sampled with the optimal probabilities p_i ∝ ‖g_i‖·‖x_i‖ its variance is (S_j² − ‖gᵀx‖²) / k_j ≈
S_j² / k_j with S_j = Σ_i ‖g_i‖·‖x_i‖ (the second term is a few % of the first for a ViT's gradients). The
split that minimises Σ_j S_j² / k_j at the cost of the uniform split, Σ_j c_j · k, k = max(min_k,
ceil(ratio · n)), is k_j ∝ S_j / √c_j, capped at n (the excess going to the others) and at least min_k. S_j
are running means (momentum `grad_ema`) over earlier backward passes; until every product has one, each keeps
the uniform k. Every k is fixed before its rows are drawn, so every estimate stays unbiased.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import CRSConfig


class SamplingBudget(nn.Module):
    """The split of one model's sampling budget (see the module docstring). `add(cost)` registers a product;
    in each backward pass `k(j, n)` gives product j its rows (the split is made at the pass's first request,
    from the estimates so far: one host sync per pass) and `observe(j, s)` folds in this pass's S_j (on the
    device). `estimate` [products] is a non-persistent buffer (NaN: not observed yet)."""

    def __init__(self, config: CRSConfig) -> None:
        super().__init__()
        self.config = config
        self.costs: list[int] = []
        self.register_buffer("estimate", torch.empty(0), persistent=False)
        self._k: list[int] | None = None
        self._n: int | None = None
        self._served: set[int] = set()

    def add(self, cost: int) -> int:
        """Register a product of `cost` (d_in · d_out); returns its index."""
        self.costs.append(int(cost))
        self.estimate = torch.cat([self.estimate, torch.full((1,), float("nan"))])
        return len(self.costs) - 1

    def k(self, j: int, n: int) -> int:
        """The rows product j keeps of its n in this backward pass."""
        if self._k is None or j in self._served or n != self._n:  # a new pass: split afresh
            self._k, self._n, self._served = self.split(n), n, set()
        self._served.add(j)
        return self._k[j]

    @torch.no_grad()
    def observe(self, j: int, s: Tensor) -> None:
        """Fold this pass's S_j = Σ_i ‖g_i‖·‖x_i‖ into product j's running mean (a non-finite S is left
        out)."""
        old, m = self.estimate[j], self.config.grad_ema
        new = torch.where(old.isnan(), s, old * m + s * (1 - m))
        self.estimate[j] = torch.where(torch.isfinite(s), new, old)

    def split(self, n: int) -> list[int]:
        """k_j for a batch of n rows: ∝ S_j / √c_j at the uniform split's cost (uniform until every product
        has an estimate)."""
        cfg = self.config
        uniform = cfg.num_samples(n)
        s = self.estimate.tolist()
        if not s or any(math.isnan(v) for v in s) or uniform >= n:
            return [uniform] * len(s)
        costs = self.costs
        budget = uniform * sum(costs)
        weight = [max(v, 0.0) / math.sqrt(c) for v, c in zip(s, costs, strict=True)]
        capped: set[int] = set()
        while True:  # water-filling: products whose share exceeds n keep all n; the rest share what is left
            left = budget - sum(costs[j] * n for j in capped)
            total = sum(weight[j] * costs[j] for j in range(len(s)) if j not in capped)
            share = [left * weight[j] / total if total > 0 else 0.0 for j in range(len(s))]
            over = {j for j in range(len(s)) if j not in capped and share[j] > n}
            if not over:
                break
            capped |= over
        k = [n if j in capped else share[j] for j in range(len(s))]
        return [min(n, max(cfg.min_k, math.ceil(v))) for v in k]
