"""`crs_linear` and `crs_matmul`: exact forward, column-row sampled backward.

Only the sampled rows (pre-multiplied by their unbiased scales, in the op's compute dtype) and their int32
indices are saved for backward, never the full activation, a full autocast copy, or a view of one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import GRAD_PROBS, CRSConfig
from .grad_norm import floored
from .sample_cache import GradNormSource
from .sampling import sample


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the op computes in: the autocast dtype when autocast is on for x's device, else x's."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _visit(source: GradNormSource | None, cfg: CRSConfig):
    """This forward's visit of a gradient-norm source (see `grad_norm`), or None: p ∝ ‖row‖ alone."""
    return source.visit() if source is not None and cfg.prob in GRAD_PROBS else None


def _times_estimate(norms: Tensor, visit, joint: bool = False) -> Tensor:
    """Row norms [*lead, n] times the visit's floored estimate of ‖output gradient‖ (unchanged without one).

    joint: all rows are sampled together (a linear), else per slice of the last dim (a matmul); the floor
    (`floored`) is relative to the mean over those rows."""
    est = None if visit is None else visit.weights(norms)
    return norms if est is None else norms * floored(est.expand_as(norms), joint)


class _SampledLinear(torch.autograd.Function):
    """Y_j = X W_jᵀ + b_j for one input X and several (W_j, b_j), sharing one row sample of X."""

    @staticmethod
    def forward(ctx, x, cfg: CRSConfig, grad_norm: GradNormSource | None, generator, *params):
        weights, biases = params[0::2], params[1::2]
        outs = tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))
        dtype = _compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])
        n = x2.shape[0]
        visit = _visit(grad_norm, cfg) if x.dim() >= 3 else None  # positions: the tokens (dim -2)
        k = n if visit is not None and visit.exact else cfg.num_samples(n)
        if k < n:
            norms = torch.linalg.vector_norm(x2, dim=-1, dtype=torch.float32)
            norms = _times_estimate(norms.view(x.shape[:-1]), visit, joint=True).reshape(-1)
            idx, scale = sample(norms, k, cfg.method, generator)
            rows = (x2.index_select(0, idx) * scale.unsqueeze(-1)).to(dtype)
            ctx.save_for_backward(rows, idx.to(torch.int32), *weights)
        else:
            ctx.save_for_backward(x2.to(dtype), None, *weights)
        ctx.visit, ctx.x_shape, ctx.x_dtype = visit, x.shape, x.dtype
        ctx.has_bias = tuple(b is not None for b in biases)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        rows, idx, *weights = ctx.saved_tensors
        g2 = [g.reshape(-1, g.shape[-1]) for g in grads]
        grad_x = None
        if ctx.needs_input_grad[0]:  # Σ_j G_j W_j, accumulated in place (no temporary per term)
            for j, (g, w) in enumerate(zip(g2, weights, strict=True)):
                grad_x = g @ w.to(g.dtype) if j == 0 else grad_x.addmm_(g, w.to(g.dtype))
            grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        out = []
        for j, (g, w) in enumerate(zip(g2, weights, strict=True)):
            gs = g if idx is None else g.index_select(0, idx.long())
            out.append(
                None if not ctx.needs_input_grad[4 + 2 * j] else (gs.t() @ rows.to(g.dtype)).to(w.dtype)
            )
            needs_b = ctx.has_bias[j] and ctx.needs_input_grad[5 + 2 * j]
            out.append(g.sum(0, dtype=torch.float32).to(w.dtype) if needs_b else None)
        if ctx.visit is not None:  # ‖g_i‖ of the shared row: over all the outputs that share the sample
            sq = sum(torch.linalg.vector_norm(g, dim=-1, dtype=torch.float32) ** 2 for g in g2)
            ctx.visit.update(sq.sqrt().view(ctx.x_shape[:-1]))
        return grad_x, None, None, None, *out


def _sampling_needed(cfg: CRSConfig, weights: Sequence[Tensor]) -> bool:
    return not cfg.exact and torch.is_grad_enabled() and any(w.requires_grad for w in weights)


def crs_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cfg: CRSConfig,
    grad_norm: GradNormSource | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """`F.linear(x, weight, bias)` with a column-row sampled weight gradient.

    x: [..., d_in]; weight: [d_out, d_in]; bias: [d_out] or None. Forward, grad of x and grad of bias are
    exact; grad of weight is an unbiased estimate from k = ceil(ratio · n) of the n rows of x flattened.
    grad_norm: the source of ‖output gradient‖ estimates per position (dim -2 of x) for prob="norm_grad" /
    "sample_cache" (`GradNormEMA`, `SampleGradCache`). generator: on x's device; None: torch's global RNG
    (`SamplingGenerator.for_device`). With ratio 1 (or no grad needed) this is exactly `F.linear`.
    """
    if not _sampling_needed(cfg, [weight]):
        return F.linear(x, weight, bias)
    return _SampledLinear.apply(x, cfg, grad_norm, generator, weight, bias)[0]


def crs_linear_shared(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    cfg: CRSConfig,
    grad_norm: GradNormSource | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, ...]:
    """Several linears of one input (e.g. q, k, v) that share a single row sample of x.

    Saves k rows of x once, so sampling q/k/v never stores more than one exact input did.
    """
    if not _sampling_needed(cfg, weights):
        return tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    return _SampledLinear.apply(x, cfg, grad_norm, generator, *params)


def _gather_cols(t: Tensor, idx: Tensor) -> Tensor:
    """t [..., r, n], idx [..., k] → t[..., :, idx] of shape [..., r, k]."""
    return t.gather(-1, idx.unsqueeze(-2).expand(*t.shape[:-1], idx.shape[-1]))


def _gather_rows(t: Tensor, idx: Tensor) -> Tensor:
    """t [..., m, r], idx [..., k] → t[..., idx, :] of shape [..., k, r]."""
    return t.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, t.shape[-1]))


class _SampledMatmul(torch.autograd.Function):
    """Z = A B per leading slice; grad_A from sampled columns of B, grad_B from sampled rows of A."""

    @staticmethod
    def forward(ctx, a, b, cfg: CRSConfig, keep_a: bool, grad_norms, generator):
        z = torch.matmul(a, b)
        dtype = _compute_dtype(a)
        m, n = a.shape[-2], b.shape[-1]
        b_s = idx_n = a_s = idx_m = None
        visits = tuple(_visit(t, cfg) for t in grad_norms)
        exact = any(v is not None and v.exact for v in visits)
        if a.requires_grad:  # grad_A = G Bᵀ contracts over n: keep k of B's n columns
            k = n if exact else cfg.num_samples(n)
            if k < n:
                norms = torch.linalg.vector_norm(b, dim=-2, dtype=torch.float32)
                idx, scale = sample(_times_estimate(norms, visits[1]), k, cfg.method, generator)
                b_s = (_gather_cols(b, idx) * scale.unsqueeze(-2)).to(dtype)
                idx_n = idx.to(torch.int32)
            else:
                b_s = b.to(dtype)
        if b.requires_grad:  # grad_B = Aᵀ G contracts over m: keep k of A's m rows
            k = m if exact else cfg.num_samples(m)
            if keep_a or k >= m:
                a_s = a if keep_a else a.to(dtype)
            else:
                norms = torch.linalg.vector_norm(a, dim=-1, dtype=torch.float32)
                idx, scale = sample(_times_estimate(norms, visits[0]), k, cfg.method, generator)
                a_s = (_gather_rows(a, idx) * scale.unsqueeze(-1)).to(dtype)
                idx_m = idx.to(torch.int32)
        ctx.save_for_backward(a_s, idx_m, b_s, idx_n)
        ctx.visits, ctx.dtypes = visits, (a.dtype, b.dtype)
        return z

    @staticmethod
    def backward(ctx, g):
        a_s, idx_m, b_s, idx_n = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            gs = g if idx_n is None else _gather_cols(g, idx_n.long())
            grad_a = (gs @ b_s.to(g.dtype).transpose(-1, -2)).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            gs = g if idx_m is None else _gather_rows(g, idx_m.long())
            grad_b = (a_s.to(g.dtype).transpose(-1, -2) @ gs).to(ctx.dtypes[1])
        if ctx.visits[0] is not None:  # ‖G‖ per row of A (over n): [..., m]
            ctx.visits[0].update(torch.linalg.vector_norm(g, dim=-1, dtype=torch.float32))
        if ctx.visits[1] is not None:  # ‖G‖ per column of B (over m): [..., n]
            ctx.visits[1].update(torch.linalg.vector_norm(g, dim=-2, dtype=torch.float32))
        return grad_a, grad_b, None, None, None, None


def crs_matmul(
    a: Tensor,
    b: Tensor,
    cfg: CRSConfig,
    keep_a: bool = False,
    grad_norms: tuple[GradNormSource | None, GradNormSource | None] = (None, None),
    generator: torch.Generator | None = None,
) -> Tensor:
    """`a @ b` with column-row sampled input gradients, sampled independently per leading slice.

    a: [..., m, r]; b: [..., r, n] with equal leading dims. grad_a = G bᵀ is estimated from
    k = ceil(ratio · n) sampled columns of b (and of G); grad_b = aᵀ G from k = ceil(ratio · m) sampled
    rows of a (and of G).
    keep_a: `a` is saved by another op anyway (e.g. it is a softmax output): save it by reference, at no extra
    memory, and compute grad_b exactly. grad_norms: sources of gradient-norm estimates over m and over n, used
    with prob="norm_grad" / "sample_cache". generator: on a's device, or None (torch's global RNG). With
    ratio 1 (or no grad needed) this is exactly `torch.matmul`.
    """
    if not _sampling_needed(cfg, [a, b]):
        return torch.matmul(a, b)
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(
            f"crs_matmul needs equal leading dims, got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    return _SampledMatmul.apply(a, b, cfg, keep_a, grad_norms, generator)
