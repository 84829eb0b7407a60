"""`lean_vit_block`: a whole ViT encoder block that keeps only the residual stream for backward.

Forward is the Hugging Face `ViTLayer` forward, exactly. Backward recomputes what the activation gradients
need (both LayerNorms, q/k/v, the attention, fc1's pre-activation) from the kept residual stream, computes
every activation gradient (and those of the LayerNorms and biases) exactly, and estimates the six linears'
weight gradients from k = ceil(ratio · n) token rows drawn with the optimal CRS probabilities
p ∝ ‖g_i‖·‖x_i‖ (g, the output gradient, is known there); q, k and v share one draw of their common input.
`LeanViTLayer` (the `lean_block` target) runs it at ratios below 1 only; at ratio 1 the block is plain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.vit.modeling_vit import (
    ALL_ATTENTION_FUNCTIONS,
    ViTAttention,
    ViTLayer,
    eager_attention_forward,
)

from .config import CRSConfig
from .functional import _compute_dtype, mlp_backward, sampled_weight_grad


def _params(layer: ViTLayer) -> list[Tensor | None]:
    """The block's 16 parameters in `_LeanBlock`'s order (a missing bias is None)."""
    attn, mlp = layer.attention, layer.mlp
    mods = (
        layer.layernorm_before,
        attn.q_proj,
        attn.k_proj,
        attn.v_proj,
        attn.o_proj,
        layer.layernorm_after,
        mlp.fc1,
        mlp.fc2,
    )
    return [t for m in mods for t in (m.weight, m.bias)]


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _leaf(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().requires_grad_()


def _norm_backward(out: Tensor, leaves: list[Tensor | None], grad: Tensor) -> list[Tensor | None]:
    """Grads of a recomputed LayerNorm's input and parameters (None where a parameter is absent)."""
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad.view_as(out).to(out.dtype)))
    return [None if t is None else next(grads) for t in leaves]


class _Attention:
    """The attention half of a block recomputed from its input x, with the graphs backward needs.

    x_leaf → norm (LayerNorm, graph kept) → qkv = norm · [Wq; Wk; Wv]ᵀ (a leaf [n, 3d])
    → out = attention(q, k, v) (graph kept); `context` is out as [n, d] rows, the attention-output linear's
    input.
    """

    def __init__(self, layer: ViTLayer, x: Tensor, ln: list, w_qkv: Tensor, b_qkv, mask, dt: torch.dtype):
        attn: ViTAttention = layer.attention
        d = x.shape[-1]
        self.leaves = [x.detach().requires_grad_(), *(_leaf(p) for p in ln)]
        with torch.enable_grad():
            self.norm = F.layer_norm(self.leaves[0], (d,), *self.leaves[1:], layer.layernorm_before.eps)
        self.norm_rows = self.norm.detach().reshape(-1, d).to(dt)
        self.qkv = F.linear(self.norm_rows, w_qkv, b_qkv).requires_grad_()
        heads = (*x.shape[:-1], -1, attn.head_dim)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            attn.config._attn_implementation, eager_attention_forward
        )
        with torch.enable_grad():
            q, k, v = (
                t.view(heads).transpose(1, 2) for t in self.qkv.view(*x.shape[:-1], 3 * d).split(d, -1)
            )
            self.out, _ = interface(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
        self.context = self.out.detach().reshape(-1, d)


class _LeanBlock(torch.autograd.Function):
    """y = ViTLayer(x), saving x and, with `keep_mid`, the residual stream x1 between the two halves."""

    @staticmethod
    def forward(ctx, x, layer: ViTLayer, cfg: CRSConfig, keep_mid: bool, mask, generator, *params):
        hidden, _ = ViTAttention.forward(layer.attention, layer.layernorm_before(x), mask)
        x1 = hidden + x
        mlp = layer.mlp
        y = mlp.fc2(mlp.activation_fn(mlp.fc1(layer.layernorm_after(x1)))) + x1
        ctx.save_for_backward(x, x1 if keep_mid else None, *params)
        ctx.layer, ctx.cfg, ctx.mask, ctx.dt, ctx.generator = layer, cfg, mask, _compute_dtype(x), generator
        return y

    @staticmethod
    def backward(ctx, g):
        x, x1, *params = ctx.saved_tensors
        ln1_w, ln1_b, wq, bq, wk, bk, wv, bv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2 = params
        layer, cfg, dt, generator = ctx.layer, ctx.cfg, ctx.dt, ctx.generator
        d = x.shape[-1]
        w_qkv = torch.cat([wq, wk, wv]).to(dt)
        b_qkv = None if bq is None else torch.cat([bq, bk, bv]).to(dt)
        wo_c = wo.to(dt)

        def attention() -> _Attention:
            return _Attention(layer, x, [ln1_w, ln1_b], w_qkv, b_qkv, ctx.mask, dt)

        att = None
        if x1 is None:  # kept only x: the attention half is recomputed first, for x1 = x + o_proj(context)
            att = attention()
            x1 = F.linear(att.context, wo_c, _cast(bo, dt)).view_as(x) + x

        # MLP half: y = x1 + fc2(act(fc1(norm2(x1))))
        leaves2 = [x1.detach().requires_grad_(), _leaf(ln2_w), _leaf(ln2_b)]
        with torch.enable_grad():
            norm2 = F.layer_norm(leaves2[0], (d,), *leaves2[1:], layer.layernorm_after.eps)
        g2 = g.reshape(-1, d).to(dt)
        grad_norm2, gw1, gb1, gw2, gb2 = mlp_backward(
            norm2.detach().reshape(-1, d).to(dt),
            g2,
            w1.to(dt),
            _cast(b1, dt),
            w2.to(dt),
            layer.mlp.activation_fn,
            cfg,
            generator,
        )
        del g2
        grad_x1, g_ln2_w, g_ln2_b = _norm_backward(norm2, leaves2, grad_norm2)
        del norm2, grad_norm2, leaves2
        grad_x1 = grad_x1.to(g.dtype).add_(g)  # the residual path

        # attention half: x1 = x + o_proj(attention(qkv(norm1(x))))
        att = att or attention()
        go = grad_x1.reshape(-1, d).to(dt)
        gwo = sampled_weight_grad(go, att.context, cfg, generator)
        gbo = go.sum(0, dtype=torch.float32)
        (g_qkv,) = torch.autograd.grad(att.out, att.qkv, (go @ wo_c).view_as(att.out))
        del go
        gw_qkv = sampled_weight_grad(g_qkv, att.norm_rows, cfg, generator)  # one draw for q, k and v
        gb_qkv = g_qkv.sum(0, dtype=torch.float32)
        grad_norm1 = g_qkv @ w_qkv
        del g_qkv
        grad_x, g_ln1_w, g_ln1_b = _norm_backward(att.norm, att.leaves, grad_norm1)
        grad_x = grad_x.to(x.dtype).add_(grad_x1)

        def like(t: Tensor | None, p: Tensor | None) -> Tensor | None:
            return None if p is None or t is None else t.to(p.dtype)

        grads = [
            like(g_ln1_w, ln1_w),
            like(g_ln1_b, ln1_b),
            *(
                t
                for j, (w, b) in enumerate(((wq, bq), (wk, bk), (wv, bv)))
                for t in (like(gw_qkv[j * d : (j + 1) * d], w), like(gb_qkv[j * d : (j + 1) * d], b))
            ),
            like(gwo, wo),
            like(gbo, bo),
            like(g_ln2_w, ln2_w),
            like(g_ln2_b, ln2_b),
            like(gw1, w1),
            like(gb1, b1),
            like(gw2, w2),
            like(gb2, b2),
        ]
        return grad_x, None, None, None, None, None, *grads


def lean_vit_block(
    layer: ViTLayer,
    x: Tensor,
    cfg: CRSConfig,
    mask: Tensor | None = None,
    keep_mid: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """`ViTLayer.forward(x)` (no dropout) keeping only the residual stream for backward (the lean block).

    x: [batch, tokens, d]. Saves x and, with `keep_mid`, the residual stream between attention and MLP (one
    more [batch, tokens, d] tensor, which spares recomputing the attention-output linear); nothing else.
    Grads of x, of the LayerNorms and of the biases are exact; the six weight grads are unbiased estimates
    from k = ceil(ratio · n) of the n = batch · tokens rows, drawn with p ∝ ‖g_i‖·‖x_i‖ (q/k/v: one shared
    draw with p ∝ ‖[g_q g_k g_v]_i‖·‖x_i‖); exact at ratio 1 (up to floating-point summation order).
    generator: on x's device, or None (torch's global RNG).
    """
    params = _params(layer)
    if not torch.is_grad_enabled() or not any(p is not None and p.requires_grad for p in (x, *params)):
        return ViTLayer.forward(layer, x, mask)
    return _LeanBlock.apply(x, layer, cfg, keep_mid, mask, generator, *params)
