"""Draw k of n column-row pairs, batched over leading dims, with unbiased per-sample scales.

Both samplers return `(idx, scale)` of shape [..., k] such that, for any rows `u_i`,
`Σ_t scale_t · u_{idx_t}` is an unbiased estimate of `Σ_i u_i`. They run on the device, with no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

_TINY = 1e-30


def _probabilities(weights: Tensor) -> Tensor:
    """Normalise non-negative weights [..., n] to probabilities; an all-zero slice becomes uniform."""
    total = weights.sum(-1, keepdim=True)
    uniform = torch.full_like(weights, 1.0 / weights.shape[-1])
    return torch.where(total > 0, weights / total.clamp_min(_TINY), uniform)


def _draw(p: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """k i.i.d. indices per slice with P(i) ∝ p_i (inverse CDF). Zero-probability indices are never drawn."""
    cdf = p.cumsum(-1)
    u = torch.rand((*p.shape[:-1], k), device=p.device, dtype=p.dtype, generator=generator)
    idx = torch.searchsorted(cdf, u * cdf[..., -1:], right=True)
    return idx.clamp_max_(p.shape[-1] - 1)


def sample_crs(weights: Tensor, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """CRS: k i.i.d. draws with p ∝ weights, scale 1 / (k · p)."""
    p = _probabilities(weights)
    idx = _draw(p, k, generator)
    scale = 1.0 / (k * p.gather(-1, idx)).clamp_min(_TINY)
    return idx, scale


def sample_wta_crs(
    weights: Tensor, k: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """WTA-CRS: keep the c most probable pairs (scale 1), draw k − c from the rest.

    c in [0, k) minimises (1 − P_top_c) / (k − c); c = 0 is plain CRS. A drawn pair j gets scale
    (1 − P_C) / ((k − c) · p_j). When the top c carry all the mass the drawn part gets scale 0.
    """
    p = _probabilities(weights)
    top_p, top_idx = p.topk(k, dim=-1)
    slots = torch.arange(k, device=p.device)
    mass_before = top_p.cumsum(-1) - top_p  # P_top_c for c = 0 .. k-1
    objective = (1.0 - mass_before).clamp_min(0.0) / (k - slots).to(p.dtype)
    c = objective.argmin(-1, keepdim=True)  # [..., 1]
    kept = slots < c  # [..., k]
    rest = p.scatter(-1, top_idx, torch.where(kept, torch.zeros_like(top_p), top_p))
    remainder = rest.sum(-1, keepdim=True)  # 1 − P_C, from the rows themselves
    drawn = _draw(rest, k, generator)
    p_drawn = p.gather(-1, drawn)
    drawn_scale = remainder / ((k - c).to(p.dtype) * p_drawn.clamp_min(_TINY))
    drawn_scale = torch.where((remainder > 0) & (p_drawn > 0), drawn_scale, torch.zeros_like(drawn_scale))
    idx = torch.where(kept, top_idx, drawn)
    scale = torch.where(kept, torch.ones_like(drawn_scale), drawn_scale)
    return idx, scale


def sample(
    weights: Tensor, k: int, method: str, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Dispatch on `method` ("crs" | "wta_crs"); weights [..., n] >= 0 → idx, scale [..., k]."""
    if method == "crs":
        return sample_crs(weights, k, generator)
    return sample_wta_crs(weights, k, generator)
