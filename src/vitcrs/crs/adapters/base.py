"""`BlockAdapter`: what vitcrs must know of one family of ViT encoder blocks, and `BlockParts`, its answer.

Every family vitcrs supports is a pre-norm transformer block:

    x1 = x  + post_attention(proj(attend(qkv(norm1(x)))))
    y  = x1 + post_mlp(fc2(pre_fc2(act(fc1(norm2(x1))))))

An adapter names the parts of a block (`parts`), runs its two residual branches with the family's own code
(`attention_branch`, `mlp_branch`: the exact forward; a whole plain block runs its own class's forward)
and runs its attention core from the q/k/v projections (`attend`, the family's own code, with the two
attention matmuls optionally replaced by sampled ones). The CRS block (`vitcrs.crs.block.CRSBlock`) and
the lean ops (`vitcrs.crs.lean`) do everything else on those parts, for every family alike. A new family
is one adapter module (see `hf_vit.py`) registered in `vitcrs.crs.adapters.ADAPTERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..targets import MATMUL_TARGETS, QKV_TARGETS


@dataclass
class SampledMatmuls:
    """The attention matmuls an adapter's `attend` runs instead of `torch.matmul` (None: torch.matmul).

    scores(q, kᵀ) -> Q Kᵀ; context(p, v, p_kept) -> P V, where p_kept says that P is held by another op anyway
    (the softmax output itself: no dropout, and a dtype the matmul takes), so the op can reuse it."""

    scores: Callable[[Tensor, Tensor], Tensor] | None = None
    context: Callable[[Tensor, Tensor, bool], Tensor] | None = None


@dataclass
class BlockParts:
    """The parts of one encoder block, by role (the modules are the block's own, shared, not copies).

    qkv: the input projections, [q, k, v] (three linears) or [qkv] (one fused linear, outputs q|k|v).
    post_attention / post_mlp: what follows proj / fc2 on the residual branch, in order: dropout, layer
        scale, drop path (inactive ones included; they are skipped).
    fc1: [fc1], or [gate, up] for a gated MLP (hidden = act(gate) * up); pre_fc2: between act and fc2
        (timm's dropout and norm). attn_core_params: parameters inside the attention core (qk-norms, ...).
    heads, head_dim: of the attention; eager: the attention runs as explicit matmuls (samplable).
    """

    norm1: nn.Module
    qkv: list[nn.Linear]
    proj: nn.Linear
    post_attention: list[nn.Module]
    norm2: nn.Module
    fc1: list[nn.Linear]
    act: Callable[[Tensor], Tensor]
    pre_fc2: list[nn.Module]
    fc2: nn.Linear
    post_mlp: list[nn.Module]
    heads: int
    head_dim: int
    eager: bool
    attn_core_params: list[nn.Parameter] = field(default_factory=list)

    @property
    def gated(self) -> bool:
        return len(self.fc1) == 2

    @property
    def fused_qkv(self) -> bool:
        return len(self.qkv) == 1

    def hidden(self, u: Sequence[Tensor]) -> Tensor:
        """The MLP's hidden activation from the fc1 output(s): act(fc1) or act(gate) * up."""
        return self.act(u[0]) * u[1] if self.gated else self.act(u[0])

    def hidden_of_stacked(self, h: Tensor) -> Tensor:
        """`hidden` of the fc1 outputs stacked along the last dim ([..., f] or [..., 2f] for a gated MLP)."""
        return self.hidden(h.chunk(2, dim=-1) if self.gated else [h])


def chain(modules: Iterable[nn.Module], x: Tensor) -> Tensor:
    for m in modules:
        x = m(x)
    return x


def stochastic(module: nn.Module) -> bool:
    """Whether `module` draws random numbers when called now (dropout, drop path in training mode)."""
    p = getattr(module, "p", None) if isinstance(module, nn.Dropout) else getattr(module, "drop_prob", None)
    return module.training and isinstance(p, (int, float)) and p > 0


def active(modules: Iterable[nn.Module]) -> bool:
    """Whether a chain of post-linear modules does anything: draws (dropout, drop path) or has parameters
    (layer scale, a norm)."""
    return any(stochastic(m) or any(True for _ in m.parameters()) for m in modules)


def chain_params(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


def linear_params(linears: Iterable[nn.Linear]) -> list[Tensor | None]:
    return [t for lin in linears for t in (lin.weight, lin.bias)]


class BlockAdapter:
    """One family of encoder blocks (subclass per family; see the module docstring).

    name: how messages and logs call the family. `matches(module)`: the module is one of its blocks.
    """

    name = "?"

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def parts(self, block: nn.Module) -> BlockParts:
        raise NotImplementedError

    def hidden_states(self, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None]:
        """(x, attention mask or None) from the arguments the model calls its block with."""
        raise NotImplementedError

    def attention_branch(self, block: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
        """post_attention(proj(attend(qkv(norm1(x))))) as the family computes it (exact forward)."""
        raise NotImplementedError

    def mlp_branch(self, block: nn.Module, x1: Tensor) -> Tensor:
        """post_mlp(fc2(...(norm2(x1)))) as the family computes it (exact forward)."""
        raise NotImplementedError

    def attend(
        self, block: nn.Module, qkv: Sequence[Tensor], mask: Tensor | None, sampled: SampledMatmuls | None
    ) -> Tensor:
        """The attention core from the q/k/v projections' outputs (`BlockParts.qkv` order, each [B, T, *]):
        heads, qk-norms, attention (with its dropout), heads merged, up to proj's input [B, T, heads·dim]."""
        raise NotImplementedError

    def attention_dropout(self, block: nn.Module) -> float:
        """The dropout probability the attention applies to its probabilities now (0 in eval mode)."""
        raise NotImplementedError

    def check_targets(self, block: nn.Module, targets: Iterable[str]) -> None:
        """ValueError for targets this block cannot sample (the message names the target and why)."""
        parts = self.parts(block)
        t = set(targets)
        matmuls = sorted(t & set(MATMUL_TARGETS))
        if matmuls and not parts.eager:
            raise ValueError(
                f"crs.targets {matmuls} sample the attention matmuls, which exist only when attention runs "
                f"eagerly, but this {self.name} block runs fused attention (sdpa). {self.eager_hint}, or "
                f"drop {matmuls} from crs.targets."
            )
        qkv = t & set(QKV_TARGETS)
        if parts.fused_qkv and qkv and len(qkv) < 3:
            raise ValueError(
                f"crs.targets has {sorted(qkv)} but not all of query, key, value: this {self.name} block "
                "computes them in one fused linear (qkv), which is sampled as one. Target query, key and "
                "value together."
            )

    eager_hint = "Run eager attention"


def eager_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    scaling: float,
    dropout: float,
    sampled: SampledMatmuls | None,
    scale_query_first: bool,
    softmax_in_float32: bool,
) -> Tensor:
    """softmax(q kᵀ · scaling + mask) v with q, k, v [B, H, T, dh] -> [B, H, T, dh], as a family's eager
    attention computes it (timm scales q first; transformers scales the scores and takes the softmax in
    float32), with the matmuls of `sampled` where given."""
    sampled = sampled or SampledMatmuls()
    kt = k.transpose(-2, -1)
    if scale_query_first:
        q = q * scaling
    scores = sampled.scores(q, kt) if sampled.scores is not None else torch.matmul(q, kt)
    if not scale_query_first:
        scores = scores * scaling
    if mask is not None:
        scores = scores + mask
    if softmax_in_float32:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        cast = probs.to(q.dtype)
    else:
        probs = cast = scores.softmax(dim=-1)
    if sampled.context is None:
        return torch.matmul(torch.nn.functional.dropout(cast, p=dropout, training=dropout > 0), v)
    # softmax keeps its output for its own backward: the context matmul reuses it (p_kept) rather than store a
    # sample or a cast copy of it. That needs P as it is: no dropout, and a dtype the matmul takes (autocast
    # casts it; a bf16/fp16 model needs the cast copy).
    kept = dropout == 0.0 and (torch.is_autocast_enabled(q.device.type) or probs.dtype == q.dtype)
    p = probs if kept else cast
    if dropout > 0.0:
        p = torch.nn.functional.dropout(p, p=dropout, training=True)
    return sampled.context(p, v, kept)
