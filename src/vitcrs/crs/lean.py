"""The lean ops: a block's MLP half, or a whole block, that keeps only its residual-stream input for backward.

Forward runs the block's own code (`BlockAdapter.attention_branch` / `mlp_branch`), so it is the plain
model's forward to the bit. Backward recomputes what the gradients need from the kept residual stream
(LayerNorms, q/k/v, the attention, fc1's pre-activation), with the forward's random state (dropout, drop
path: the same masks) and autocast state, computes every activation gradient exactly (and the gradients of
the norms, biases, layer scales and qk-norms), and estimates each linear's weight gradient gᵀx from
k = ceil(ratio · n) of its n = batch · tokens rows drawn with the optimal CRS probabilities p ∝ ‖g_i‖·‖x_i‖
(both factors are known in backward); linears of one input (q/k/v, a gated MLP's gate/up) share one draw.

- `lean_block(block, x, mask, keep_mid, keep_dtype)`: the whole block; keeps x and, with `keep_mid`, the
  stream between the two halves x1 = x + attention branch (else it recomputes the attention half first to
  get x1).
- `lean_mlp(block, x1, keep_dtype)`: the MLP branch alone (the `mlp` target), keeping x1.
The stream is kept in `keep_dtype` (`crs.keep_dtype`) when that is narrower than it is: half the bytes in
bfloat16, recomputed from the rounded values in backward.
Both also keep ‖act(h_i)‖ per row (n floats, fc2's sampling probabilities), recorded in the forward.

The MLP half works on its hidden activation [n, f] in `MLP_CHUNKS` row chunks (one [n, f] buffer plus one
chunk's temporaries), unless something between the activation and fc2 needs the whole tensor (timm's MLP
dropout or norm): then it is recomputed under autograd, with the linears' weight gradients sampled.
`block` is a `vitcrs.crs.block.CRSBlock` (its `parts`, `adapter` and `crs` state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters.base import BlockParts, active, chain, chain_params, linear_params
from .budget import SamplingBudget
from .config import CRSConfig
from .sampling import sample

Grads = dict[Tensor, Tensor]  # parameter -> its gradient (summed where a parameter is used twice)
RNGState = tuple[Tensor, Tensor | None]  # CPU generator state, and the CUDA device's (None off CUDA)


# ---------------------------------------------------------------- weight gradients with p ∝ ‖g‖·‖x‖
@dataclass
class Sampler:
    """How the lean ops draw the rows of their weight gradients: `cfg`'s method, ratio and min_k, the model's
    sampling stream (`generator`; None: torch's global RNG) and, with `crs.budget="split"`, the model's
    `SamplingBudget` with this block's product indices by op ("qkv", "proj", "fc1", "fc2")."""

    cfg: CRSConfig
    generator: torch.Generator | None = None
    budget: SamplingBudget | None = None
    ids: dict[str, int] = field(default_factory=dict)

    def _index(self, op: str) -> int | None:
        return self.ids.get(op) if self.budget is not None else None

    def k(self, op: str, n: int) -> int:
        """The rows product `op` keeps of its n (the budget's split, else max(min_k, ceil(ratio · n)))."""
        j = self._index(op)
        return self.cfg.num_samples(n) if j is None else self.budget.k(j, n)

    def keeps_all(self, op: str, n: int) -> bool:
        """Whether `op` keeps every row and observes nothing: its exact product needs no norms."""
        return self._index(op) is None and self.k(op, n) >= n

    def draw(self, op: str, g: Tensor, x_norms: Tensor) -> tuple[Tensor, Tensor] | None:
        """k of g's n rows drawn with p ∝ ‖g_i‖·‖x_i‖ (the optimal CRS p for gᵀ x), or None when k = n; the
        budget gets this product's S = Σ_i ‖g_i‖·‖x_i‖."""
        n = g.shape[0]
        norms = torch.linalg.vector_norm(g, dim=-1, dtype=torch.float32) * x_norms
        if (j := self._index(op)) is not None:
            self.budget.observe(j, norms.sum())
        k = self.k(op, n)
        return None if k >= n else sample(norms, k, self.cfg.method, self.generator)


def _scaled_rows(t: Tensor, idx: Tensor, scale: Tensor) -> Tensor:
    return t.index_select(0, idx) * scale.unsqueeze(-1).to(t.dtype)


# Sampled weight gradients gather their k rows in this many chunks: one chunk's gathered rows exist at a time.
GATHER_CHUNKS = 4


class Rows:
    """The rows [n, i] of a linear's input, formed when asked for: `whole()` (its row norms are taken then)
    and `at(idx)` (the rows `idx` only), so that a recomputable input need not stay whole in memory."""

    def __init__(self, whole: Callable[[], Tensor], at: Callable[[Tensor], Tensor]) -> None:
        self._whole, self._at, self._norms = whole, at, None

    @classmethod
    def of(cls, t: Tensor) -> Rows:
        """The rows of a tensor at hand, [n, i]."""
        return cls(lambda: t, lambda idx: t.index_select(0, idx))

    def whole(self) -> Tensor:
        t = self._whole()
        if self._norms is None:
            self._norms = torch.linalg.vector_norm(t, dim=-1, dtype=torch.float32)
        return t

    @property
    def norms(self) -> Tensor:
        """‖x_i‖ of every row (fp32 [n])."""
        if self._norms is None:
            self.whole()
        return self._norms

    def at(self, idx: Tensor) -> Tensor:
        return self._at(idx)


def sampled_weight_grad(g: Tensor, x: Tensor | Rows, sampler: Sampler, op: str = "") -> Tensor:
    """gᵀ x ([n, o] and [n, i] → [o, i]) from the k rows `sampler` gives product `op` (k = ceil(ratio · n)
    unless a budget splits them), drawn with p ∝ ‖g_i‖·‖x_i‖ (the optimal CRS probabilities for this product);
    exact gᵀ x when k = n. The k rows are gathered `GATHER_CHUNKS` at a time. x: the rows, or `Rows` that form
    them on demand."""
    rows = x if isinstance(x, Rows) else Rows.of(x)
    if sampler.keeps_all(op, g.shape[0]):
        return g.t() @ rows.whole()
    pick = sampler.draw(op, g, rows.norms)
    return g.t() @ rows.whole() if pick is None else _gathered_product(g, *pick, rows.at)


def _gathered_product(g: Tensor, idx: Tensor, scale: Tensor, rows_at: Callable[[Tensor], Tensor]) -> Tensor:
    """Σ_t scale_t g_{idx_t}ᵀ x_{idx_t} with x's rows from `rows_at`, a chunk of the draw at a time."""
    step = -(-idx.numel() // GATHER_CHUNKS)
    out = None
    for i in range(0, idx.numel(), step):
        part = _scaled_rows(g, idx[i : i + step], scale[i : i + step]).t() @ rows_at(idx[i : i + step])
        out = part if out is None else out.add_(part)
    return out


class _Norm:
    """A block's LayerNorm of the kept stream x, recomputed in backward keeping only its statistics: its
    output is handed out once (`rows().whole()`) and formed again at the rows asked for (`rows().at`), its
    backward is LayerNorm's own kernel. Another norm keeps its output and goes through autograd."""

    def __init__(self, norm: nn.Module, x: Tensor, dt: torch.dtype) -> None:
        self.norm, self.x, self.dt, self.d = norm, x, dt, x.shape[-1]
        self.native = isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1
        if self.native:
            self._out, self.mean, self.rstd = torch.ops.aten.native_layer_norm(
                x, [self.d], norm.weight, norm.bias, norm.eps
            )
        else:
            with torch.enable_grad():
                self.leaf = x.detach().requires_grad_()
                self.out = norm(self.leaf)

    def _whole(self) -> Tensor:
        if not self.native:
            return self.out.detach().reshape(-1, self.d).to(self.dt)
        out, self._out = self._out, None  # handed out: this object keeps no reference to it
        if out is None:
            out = torch.ops.aten.native_layer_norm(self.x, [self.d], self.norm.weight, self.norm.bias,
                                                   self.norm.eps)[0]  # fmt: skip
        return out.reshape(-1, self.d).to(self.dt)

    def _at(self, idx: Tensor) -> Tensor:
        if not self.native:
            return self.out.detach().reshape(-1, self.d).index_select(0, idx).to(self.dt)
        n = self.norm
        rows = self.x.reshape(-1, self.d).index_select(0, idx)
        return torch.ops.aten.native_layer_norm(rows, [self.d], n.weight, n.bias, n.eps)[0].to(self.dt)

    def rows(self) -> Rows:
        return Rows(self._whole, self._at)

    def backward(self, grad: Tensor, grads: Grads) -> Tensor:
        """The gradient of x given that of the norm's output ([n, d] rows); adds the norm's parameters'."""
        params = list(self.norm.parameters())
        if not self.native:
            g_x, *g_params = torch.autograd.grad(self.out, [self.leaf, *params], grad.view_as(self.out))
            _add(grads, params, g_params)
            return g_x
        n = self.norm
        mask = [True, n.weight is not None, n.bias is not None]
        g_x, g_w, g_b = torch.ops.aten.native_layer_norm_backward(
            grad.reshape(self.x.shape).to(self.x.dtype), self.x, [self.d], self.mean, self.rstd, n.weight,
            n.bias, mask,
        )  # fmt: skip
        _add(
            grads, [p for p in (n.weight, n.bias) if p is not None], [t for t in (g_w, g_b) if t is not None]
        )
        return g_x


# The MLP half's backward works on its hidden activation [n, f] in this many row chunks: besides one full-size
# buffer (the recomputed pre-activation, overwritten by its gradient) only one chunk's temporaries exist.
MLP_CHUNKS = 4


def _is_gelu(act) -> bool:
    """`F.gelu` itself, transformers' `GELUActivation` (which calls it) or an exact `nn.GELU`."""
    return getattr(act, "act", act) is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none")


def _act_backward_(act, h: Tensor, grad: Tensor) -> None:
    """Overwrite h with grad ⊙ act'(h) (h: the pre-activation; for a gated act, both halves): GELU's own
    backward kernel in place, else autograd through a recomputed act(h)."""
    if _is_gelu(act):
        torch.ops.aten.gelu_backward.grad_input(grad, h, grad_input=h)
        return
    leaf = h.detach().requires_grad_()
    with torch.enable_grad():
        h.copy_(torch.autograd.grad(act(leaf), leaf, grad)[0])


def mlp_backward(
    x2: Tensor | Rows,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    act,
    sampler: Sampler,
    output_grad,
    act_norms: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of `fc2(act(fc1(x2)))` from its input alone: recomputes the hidden activation, chunk by chunk.

    x2: [n, d] MLP input, or `Rows` forming it (whole once, then at fc1's sampled rows); w1 [f, d] (a gated
    MLP: gate and up stacked, [2f, d], act taking both halves), b1, w2 [d, f], b2 in the compute dtype.
    output_grad(output): the gradient [n, d] of the MLP's output, given a function that recomputes that output
    (called only when the caller needs it: a layer scale's gradient). Returns (grad_x2, grad_w1, grad_b1,
    grad_w2, grad_b2): the grads of x2 and of the biases (fp32 sums) exact, the two weight grads from
    k = ceil(ratio · n) rows drawn with p ∝ ‖g_i‖·‖input_i‖ (exact at ratio 1). Memory: one [n, f] buffer
    (the pre-activation, overwritten by its gradient) plus one chunk's temporaries. act_norms: ‖act(h_i)‖ per
    row (fp32 [n]) when the forward recorded them (`record_act_norms`), else formed here a chunk at a time.
    """
    x2 = x2 if isinstance(x2, Rows) else Rows.of(x2)
    h = F.linear(x2.whole(), w1, b1)  # pre-activation [n, f]
    step = -(-h.shape[0] // MLP_CHUNKS)
    rows = [slice(i, i + step) for i in range(0, h.shape[0], step)]
    g2 = output_grad(lambda: torch.cat([F.linear(act(h[r]), w2, b2) for r in rows]))

    # grad_w2 = gᵀ act(h): act(h) formed a chunk at a time (for its row norms), then at sampled rows only
    pick = None
    if not sampler.keeps_all("fc2", h.shape[0]):
        if act_norms is None or act_norms.shape[0] != h.shape[0]:
            act_norms = torch.cat(
                [torch.linalg.vector_norm(act(h[r]), dim=-1, dtype=torch.float32) for r in rows]
            )
        pick = sampler.draw("fc2", g2, act_norms)
    if pick is None:
        grad_w2 = sum(g2[r].t() @ act(h[r]) for r in rows)
    else:
        grad_w2 = _gathered_product(g2, *pick, lambda idx: act(h.index_select(0, idx)))

    # grad_h = act'(h) ⊙ (g W2), written over h chunk by chunk
    for r in rows:
        _act_backward_(act, h[r], g2[r] @ w2)
    grad_h, h = h, None

    grad_w1 = sampled_weight_grad(grad_h, x2, sampler, "fc1")
    grad_b1 = grad_h.sum(0, dtype=torch.float32)
    grad_b2 = g2.sum(0, dtype=torch.float32)
    grad_x2 = grad_h @ w1
    return grad_x2, grad_w1, grad_b1, grad_w2, grad_b2


class _LinearSampledInBackward(torch.autograd.Function):
    """Y_j = X W_jᵀ + b_j (one input, several linears), keeping X whole: grad of X and of the biases exact,
    the W_j grads from one draw of k rows with p ∝ ‖[G_1 … G_J]_i‖·‖X_i‖. For recomputations in backward."""

    @staticmethod
    def forward(ctx, x, sampler: Sampler, op: str, *params):
        weights, biases = params[0::2], params[1::2]
        ctx.save_for_backward(x, *weights)
        ctx.sampler, ctx.op, ctx.has_bias = sampler, op, [b is not None for b in biases]
        return tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        g = torch.cat([t.reshape(-1, t.shape[-1]) for t in grads], dim=-1)
        w = torch.cat(weights).to(g.dtype)
        grad_x = (g @ w).reshape(x.shape).to(x.dtype)
        gw = sampled_weight_grad(g, x.reshape(-1, x.shape[-1]).to(g.dtype), ctx.sampler, ctx.op)
        gb = g.sum(0, dtype=torch.float32)
        out, start = [], 0
        for weight, has_bias in zip(weights, ctx.has_bias, strict=True):
            stop = start + weight.shape[0]
            out += [gw[start:stop].to(weight.dtype), gb[start:stop].to(weight.dtype) if has_bias else None]
            start = stop
        return grad_x, None, None, *out


def _sampled_in_backward(x: Tensor, linears: Sequence[nn.Linear], sampler: Sampler, op: str) -> tuple:
    return _LinearSampledInBackward.apply(x, sampler, op, *linear_params(linears))


# ---------------------------------------------------------------- replaying the forward's state
def rng_state(device: torch.device) -> RNGState:
    """The random state the block's forward starts from (CPU, and the CUDA device's)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextmanager
def replayed(state: RNGState | None, device: torch.device) -> Iterator[None]:
    """Inside: torch's random state is `state` (the same dropout and drop-path masks as the forward drew);
    outside it is left as it was. None: nothing to replay (the forward was not training)."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _autocast_state(device: torch.device) -> tuple[str, bool, torch.dtype]:
    return device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


def _compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# ---------------------------------------------------------------- helpers on parameter gradients
def _add(grads: Grads, params: Iterable[Tensor], values: Iterable[Tensor | None]) -> None:
    for p, v in zip(params, values, strict=True):
        if v is not None:
            grads[p] = v if p not in grads else grads[p] + v


def _stacked(linears: Sequence[nn.Linear], dt: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """The linears' weights (and biases) stacked along the output dim, in dtype `dt`."""
    if len(linears) == 1:
        b = linears[0].bias
        return linears[0].weight.to(dt), None if b is None else b.to(dt)
    w = torch.cat([lin.weight for lin in linears]).to(dt)
    no_bias = any(lin.bias is None for lin in linears)
    return w, None if no_bias else torch.cat([lin.bias for lin in linears]).to(dt)


def _store(grads: Grads, linears: Sequence[nn.Linear], gw: Tensor, gb: Tensor) -> None:
    """Split stacked weight / bias gradients back to their linears."""
    start = 0
    for lin in linears:
        stop = start + lin.out_features
        _add(grads, [lin.weight], [gw[start:stop]])
        if lin.bias is not None:
            _add(grads, [lin.bias], [gb[start:stop]])
        start = stop


# ---------------------------------------------------------------- the two halves' backward
def _mlp_half_backward(
    parts: BlockParts, sampler: Sampler, x1: Tensor, g: Tensor, rng, dt, grads: Grads, act_norms=None
) -> Tensor:
    """The gradient of x1 through the MLP branch; adds the branch's parameter gradients to `grads`."""
    if active(parts.pre_fc2):
        return _mlp_half_autograd(parts, sampler, x1, g, rng, grads)
    d = x1.shape[-1]
    norm = _Norm(parts.norm2, x1, dt)
    w1, b1 = _stacked(parts.fc1, dt)
    fc2 = parts.fc2
    b2 = None if fc2.bias is None else fc2.bias.to(dt)
    post = parts.post_mlp

    def output_grad(output) -> Tensor:
        if not active(post):
            return g.reshape(-1, d).to(dt)
        params = chain_params(post)
        m = output() if params else torch.zeros((g.numel() // d, d), dtype=dt, device=g.device)
        with replayed(rng, x1.device), torch.enable_grad():  # the branch's draws, after the MLP's own (none)
            m_leaf = m.view_as(x1).requires_grad_()
            out = chain(post, m_leaf)
        g_m, *g_params = torch.autograd.grad(out, [m_leaf, *params], g)
        _add(grads, params, g_params)
        return g_m.reshape(-1, d).to(dt)

    act = parts.hidden_of_stacked if parts.gated else parts.act
    grad_rows, gw1, gb1, gw2, gb2 = mlp_backward(
        norm.rows(), w1, b1, fc2.weight.to(dt), b2, act, sampler, output_grad, act_norms
    )
    _store(grads, parts.fc1, gw1, gb1)
    _store(grads, [fc2], gw2, gb2)
    return norm.backward(grad_rows, grads)


def _mlp_half_autograd(parts: BlockParts, sampler: Sampler, x1: Tensor, g: Tensor, rng, grads):
    """The MLP half recomputed whole under autograd (with the forward's masks), its linears' weight
    gradients sampled: for MLPs with something between the activation and fc2 (timm's dropout, norm)."""
    params = [
        *parts.norm2.parameters(),
        *(p for p in linear_params(parts.fc1) if p is not None),
        *chain_params(parts.pre_fc2),
        *(p for p in linear_params([parts.fc2]) if p is not None),
        *chain_params(parts.post_mlp),
    ]
    with replayed(rng, x1.device), torch.enable_grad():
        x1_leaf = x1.detach().requires_grad_()
        u = _sampled_in_backward(parts.norm2(x1_leaf), parts.fc1, sampler, "fc1")
        hidden = chain(parts.pre_fc2, parts.hidden(u))
        (m,) = _sampled_in_backward(hidden, [parts.fc2], sampler, "fc2")
        out = chain(parts.post_mlp, m)
    g_x1, *g_params = torch.autograd.grad(out, [x1_leaf, *params], g, allow_unused=True)
    _add(grads, params, g_params)
    return g_x1


# Eager attention keeps its [batch, heads, tokens, tokens] probabilities (and their gradients) for backward:
# the lean block recomputes and backpropagates it in this many batch chunks (when it draws no dropout mask),
# so that transient is a fraction of a full attention's.
ATTENTION_CHUNKS = 4


def _batch_chunks(block, x: Tensor) -> list[slice]:
    """Batch slices for the attention's recomputation: chunks for eager attention without dropout (their
    recomputation draws no random numbers, so chunks do not change any mask), else the whole batch."""
    batch = x.shape[0]
    if not block.parts.eager or block.adapter.attention_dropout(block) > 0 or batch < 2:
        return [slice(0, batch)]
    step = -(-batch // ATTENTION_CHUNKS)
    return [slice(i, i + step) for i in range(0, batch, step)]


def _rows(mask: Tensor | None, rows: slice, batch: int) -> Tensor | None:
    """An attention mask for the images `rows` (a mask broadcast over the batch as it is)."""
    return mask[rows] if mask is not None and mask.dim() > 0 and mask.shape[0] == batch > 1 else mask


class _AttentionHalf:
    """The attention half recomputed from the block input x, with the graphs its backward needs:

    x (leaf) → norm1 (graph) → qkv = norm1 · W_qkvᵀ (a leaf [B, T, 3I]: q/k/v stacked) → ctx = attend(qkv)
    (graph: the family's attention, its dropout replayed) → o = ctx · W_oᵀ → branch = post_attention(o)
    (graph when the chain does anything: dropout, layer scale, drop path). o and the branch are formed only
    when needed (`need_branch`: x1 = x + branch is recomputed; or an active chain). Eager attention without
    dropout is recomputed with its graph chunk by chunk in `backward` (`ATTENTION_CHUNKS`), forming the
    attention output on the way, unless o was needed here (then it is formed here once more, without a graph).
    """

    def __init__(self, block, x: Tensor, mask, rng, dt, need_branch: bool) -> None:
        parts: BlockParts = block.parts
        self.block, self.parts, self.dt, self.mask = block, parts, dt, mask
        self.chunks = _batch_chunks(block, x)
        with replayed(rng, x.device), torch.enable_grad():
            self.norm = _Norm(parts.norm1, x, dt)
            self.rows = self.norm.rows()  # LayerNorm(x): formed here for q/k/v, again at their sampled rows
            with torch.no_grad():
                w, b = _stacked(parts.qkv, dt)
                qkv = F.linear(self.rows.whole(), w, b)
            self.qkv = qkv.view(*x.shape[:-1], -1).requires_grad_()
            chained = active(parts.post_attention)
            self.ctx = self.o = self.branch = None
            if len(self.chunks) == 1:
                self.ctx = block.adapter.attend(block, self._split(self.qkv), mask, None)
            elif chained or need_branch:  # the attention output is needed now (else formed in `backward`)
                with torch.no_grad():
                    self.ctx = torch.cat([self._attend(self.qkv[rows], rows) for rows in self.chunks])
            if chained or need_branch:
                proj = parts.proj
                bias = None if proj.bias is None else proj.bias.to(dt)
                with torch.no_grad():
                    o = F.linear(self.ctx.detach(), proj.weight.to(dt), bias)
                if chained:
                    self.o = o.requires_grad_()
                    self.branch = chain(parts.post_attention, self.o)
                else:
                    self.branch = o

    def _split(self, qkv: Tensor) -> list[Tensor]:
        return list(qkv.split([lin.out_features for lin in self.parts.qkv], dim=-1))

    def _attend(self, qkv: Tensor, rows: slice) -> Tensor:
        mask = _rows(self.mask, rows, self.qkv.shape[0])
        return self.block.adapter.attend(self.block, self._split(qkv), mask, None)

    def _qkv_grad(self, g_ctx: Tensor, grads: Grads) -> tuple[Tensor, Tensor]:
        """(the gradient of the stacked q/k/v given that of the attention output, the attention output),
        chunk by chunk if chunked (the output formed on the way when it was not formed before); adds the
        attention core's parameter gradients (qk-norms)."""
        core, ctx = self.parts.attn_core_params, self.ctx
        if len(self.chunks) == 1:
            g_qkv, *g_core = torch.autograd.grad(ctx, [self.qkv, *core], g_ctx.to(ctx.dtype))
            _add(grads, core, g_core)
            return g_qkv, ctx.detach()
        keep = ctx is None
        for rows in self.chunks:
            with torch.enable_grad():
                leaf = self.qkv[rows].detach().requires_grad_()
                out = self._attend(leaf, rows)
            if keep:
                ctx = torch.empty(g_ctx.shape, dtype=out.dtype, device=out.device) if ctx is None else ctx
                ctx[rows] = out.detach()
            g_rows, *g_core = torch.autograd.grad(out, [leaf, *core], g_ctx[rows].to(out.dtype))
            self.qkv[rows] = g_rows  # these rows of q/k/v are done with: their gradient takes their place
            _add(grads, core, g_core)
            del out, g_rows, leaf
        g_qkv, self.qkv = self.qkv, None
        return g_qkv, ctx

    def backward(self, g_x1: Tensor, sampler: Sampler, grads: Grads) -> Tensor:
        """The gradient of x through the attention branch, given that of x1; adds the parameter gradients."""
        parts, dt = self.parts, self.dt
        if self.o is not None:
            params = chain_params(parts.post_attention)
            g_o, *g_params = torch.autograd.grad(self.branch, [self.o, *params], g_x1)
            _add(grads, params, g_params)
        else:
            g_o = g_x1
        proj = parts.proj
        go = g_o.reshape(-1, g_o.shape[-1]).to(dt)
        g_ctx = (go @ proj.weight.to(dt)).view(*self.qkv.shape[:-1], -1)
        g_qkv, ctx = self._qkv_grad(g_ctx, grads)
        del g_ctx
        self.qkv = self.ctx = None
        ctx_rows = ctx.reshape(-1, ctx.shape[-1]).to(dt)
        gw = sampled_weight_grad(go, ctx_rows, sampler, "proj")
        _store(grads, [proj], gw, go.sum(0, dtype=torch.float32))
        del go, ctx_rows, ctx
        gq = g_qkv.reshape(-1, g_qkv.shape[-1]).to(dt)
        del g_qkv
        gw = sampled_weight_grad(gq, self.rows, sampler, "qkv")
        _store(grads, parts.qkv, gw, gq.sum(0, dtype=torch.float32))
        w, _ = _stacked(parts.qkv, dt)
        g_norm = gq @ w
        del gq
        return self.norm.backward(g_norm, grads)


def block_sampler(block, device: torch.device) -> Sampler:
    """The `Sampler` of a CRS block's lean ops on `device`: its model's config, stream and budget."""
    state = block.crs
    return Sampler(state.config, state.generator.for_device(device), state.budget, block.budget_ids)


def _param_grads(params: Sequence[Tensor], grads: Grads) -> list[Tensor | None]:
    return [None if (t := grads.get(p)) is None else t.to(p.dtype) for p in params]


@contextmanager
def record_act_norms(parts: BlockParts) -> Iterator[list[Tensor]]:
    """Inside, the MLP activation module's output row norms ‖act(h_i)‖ (fp32 [n]) of each call are appended to
    the yielded list (fc2's sampling probabilities need them in backward; recording them in the forward
    spares forming act(h) once more). Nothing is recorded for a gated MLP or a plain-function activation."""
    norms: list[Tensor] = []
    act = parts.act
    if parts.gated or not isinstance(act, nn.Module):
        yield norms
        return

    def hook(module, inputs, out: Tensor) -> None:
        norms.append(torch.linalg.vector_norm(out.reshape(-1, out.shape[-1]), dim=-1, dtype=torch.float32))

    handle = act.register_forward_hook(hook)
    try:
        yield norms
    finally:
        handle.remove()


def _kept(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """The residual stream t as the lean ops keep it for backward: cast to `dtype` (`crs.keep_dtype`) when
    that is narrower, else t itself."""
    return t if dtype is None or dtype.itemsize >= t.dtype.itemsize else t.to(dtype)


class _LeanBlock(torch.autograd.Function):
    """y = block(x), saving x and, with `keep_mid`, the residual stream x1 between the two halves (in
    `keep_dtype` when it is narrower)."""

    @staticmethod
    def forward(ctx, x, block, keep_mid: bool, keep_dtype, mask, *params):
        adapter, training = block.adapter, block.training
        rng1 = rng_state(x.device) if training else None
        x1 = x + adapter.attention_branch(block, x, mask)
        rng2 = rng_state(x.device) if training else None
        with record_act_norms(block.parts) as act_norms:
            y = x1 + adapter.mlp_branch(block, x1)
        kept_x1 = _kept(x1, keep_dtype) if keep_mid else None
        ctx.save_for_backward(_kept(x, keep_dtype), kept_x1, act_norms[0] if len(act_norms) == 1 else None)
        ctx.stream_dtypes = x.dtype, x1.dtype
        ctx.block, ctx.mask, ctx.rng, ctx.params = block, mask, (rng1, rng2), params
        ctx.amp, ctx.dt = _autocast_state(x.device), _compute_dtype(x)
        return y

    @staticmethod
    def backward(ctx, g):
        x, x1, act_norms = ctx.saved_tensors
        x, x1 = x.to(ctx.stream_dtypes[0]), None if x1 is None else x1.to(ctx.stream_dtypes[1])
        block = ctx.block
        sampler = block_sampler(block, x.device)
        grads: Grads = {}
        device_type, enabled, dtype = ctx.amp
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            att = None
            if x1 is None:  # kept only x: the attention half is recomputed first, for x1 = x + its branch
                att = _AttentionHalf(block, x, ctx.mask, ctx.rng[0], ctx.dt, need_branch=True)
                x1 = x + att.branch.detach()
                if att.o is None:  # the branch was only needed for x1
                    att.branch = None
            g_x1 = _mlp_half_backward(block.parts, sampler, x1, g, ctx.rng[1], ctx.dt, grads, act_norms)
            del x1
            g_x1 = g_x1.to(g.dtype).add_(g)  # the residual path
            att = att or _AttentionHalf(block, x, ctx.mask, ctx.rng[0], ctx.dt, need_branch=False)
            g_x = att.backward(g_x1, sampler, grads).to(x.dtype).add_(g_x1)
        return g_x, None, None, None, None, *_param_grads(ctx.params, grads)


class _LeanMLP(torch.autograd.Function):
    """The MLP branch of a block, mlp_branch(x1), saving x1 only (in `keep_dtype` when it is narrower)."""

    @staticmethod
    def forward(ctx, x1, block, keep_dtype, *params):
        ctx.rng = rng_state(x1.device) if block.training else None
        with record_act_norms(block.parts) as act_norms:
            branch = block.adapter.mlp_branch(block, x1)
        ctx.save_for_backward(_kept(x1, keep_dtype), act_norms[0] if len(act_norms) == 1 else None)
        ctx.stream_dtype, ctx.block, ctx.params = x1.dtype, block, params
        ctx.amp, ctx.dt = _autocast_state(x1.device), _compute_dtype(x1)
        return branch

    @staticmethod
    def backward(ctx, g):
        x1, act_norms = ctx.saved_tensors
        x1 = x1.to(ctx.stream_dtype)
        grads: Grads = {}
        device_type, enabled, dtype = ctx.amp
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            sampler = block_sampler(ctx.block, x1.device)
            g_x1 = _mlp_half_backward(ctx.block.parts, sampler, x1, g, ctx.rng, ctx.dt, grads, act_norms)
        return g_x1.to(x1.dtype), None, None, *_param_grads(ctx.params, grads)


def _needs_graph(x: Tensor, params: Sequence[Tensor]) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


def lean_block(
    block, x: Tensor, mask: Tensor | None = None, keep_mid: bool = True, keep_dtype: torch.dtype | None = None
) -> Tensor:
    """The block's forward on x [batch, tokens, d] (exact), keeping only the residual stream for backward:
    x and, with `keep_mid`, x1 (one more [batch, tokens, d] tensor, which spares recomputing the attention
    half in backward), in `keep_dtype` when that is narrower (None: as computed). Grads of x and of every
    parameter but the linears' weights are exact; those are unbiased estimates with p ∝ ‖g_i‖·‖x_i‖ (exact at
    ratio 1, up to floating-point summation order). A narrower `keep_dtype` adds the error of recomputing
    from the rounded stream to every gradient."""
    params = tuple(block.parameters())
    if not _needs_graph(x, params):
        x1 = x + block.adapter.attention_branch(block, x, mask)
        return x1 + block.adapter.mlp_branch(block, x1)
    return _LeanBlock.apply(x, block, keep_mid, keep_dtype, mask, *params)


def mlp_half_params(parts: BlockParts) -> tuple[Tensor, ...]:
    """The parameters of a block's MLP branch (norm2, fc1, between, fc2, after), each once."""
    mods = [parts.norm2, *parts.fc1, *parts.pre_fc2, parts.fc2, *parts.post_mlp]
    return tuple(dict.fromkeys(p for m in mods for p in m.parameters()))


def lean_mlp(block, x1: Tensor, keep_dtype: torch.dtype | None = None) -> Tensor:
    """The block's MLP branch on x1 (exact), keeping only x1 for backward (the `mlp` target; in `keep_dtype`
    when that is narrower): grads of x1, of the norm, biases and layer scale exact (but for the rounding of a
    narrower `keep_dtype`), the MLP linears' weight grads sampled with p ∝ ‖g_i‖·‖x_i‖."""
    params = mlp_half_params(block.parts)
    if not _needs_graph(x1, params):
        return block.adapter.mlp_branch(block, x1)
    return _LeanMLP.apply(x1, block, keep_dtype, *params)
