"""`CRSBlock`: one encoder block with CRS installed, in place of the block (same submodules, same names).

It adopts the block's submodules, parameters and attributes under their own names, so the model's parameter
names and `state_dict` keys stay the plain model's, and runs, by the targets of its model's `CRSState`:

- nothing sampled (the state disabled: `vitcrs.crs.uninjected`; or ratio 1, but for the `mlp` target): the
  block's own class's forward (the plain block, to the bit);
- `lean_block`: the whole block as one lean op (`vitcrs.crs.lean.lean_block`), keeping the residual stream;
- otherwise the block written out from its parts (`BlockParts`), each targeted op sampled: q/k/v as one
  shared sample of their input (`crs_linear_shared`, or the fused qkv linear), `scores` / `context` through
  the family's eager attention (`crs_matmul`), `attn_output`, `fc1` (a gated MLP's gate and up: one sample),
  `fc2` (`crs_linear`), and `mlp`: the MLP branch as the lean op keeping its input (`lean_mlp`).

Under transformers' activation checkpointing (`activation_checkpointing_enable()` sets
`gradient_checkpointing`) the block is checkpointed as transformers would, except the lean block, which
recomputes in backward already: it then keeps its input alone.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from .adapters.base import BlockAdapter, BlockParts, SampledMatmuls, chain
from .functional import crs_linear, crs_linear_shared, crs_matmul
from .lean import lean_block, lean_mlp
from .state import CRSState
from .targets import MATMUL_TARGETS, QKV_TARGETS

_MODULE_INTERNALS = frozenset(vars(nn.Module()))
ATTENTION_TARGETS = frozenset({*QKV_TARGETS, *MATMUL_TARGETS, "attn_output"})


def sampled_ops(targets: tuple[str, ...]) -> list[str]:
    """The sampled ops of a block with `targets` that draw with an estimated ‖output gradient‖ (their
    gradient-norm sources): the shared q/k/v sample, both sides of Q Kᵀ, P V's V side, the other linears."""
    t = set(targets)
    ops = ["qkv"] if t & set(QKV_TARGETS) else []
    ops += ["scores_m", "scores_n"] if "scores" in t else []
    ops += ["context_n"] if "context" in t else []
    return ops + [op for op in ("attn_output", "fc1", "fc2") if op in t]


def _unwrapped(forward):
    """A forward without transformers' checkpointing wrapper (the CRS block checkpoints itself)."""
    return getattr(forward, "__wrapped__", forward)


class CRSBlock(nn.Module):
    """An encoder block with CRS installed (see the module docstring).

    original: the block it stands in for (shares every submodule and parameter; `restore` puts it back);
    adapter: its family's `BlockAdapter`; parts: its `BlockParts`; crs: the model's `CRSState`;
    sources: this block's gradient-norm sources (op -> source; the state's, not registered here).
    """

    gradient_checkpointing = False  # transformers' activation_checkpointing_enable() sets it

    def __init__(self, block: nn.Module, adapter: BlockAdapter, state: CRSState, sources: nn.ModuleDict):
        super().__init__()
        for key, value in vars(block).items():  # the block's own settings (config, checkpointing, ...)
            if key not in _MODULE_INTERNALS:
                self.__dict__[key] = value
        self._modules.update(block._modules)
        self._parameters.update(block._parameters)
        self._buffers.update(block._buffers)
        self._non_persistent_buffers_set.update(block._non_persistent_buffers_set)
        self.training = block.training
        # plain attributes, not submodules: the state and the original belong to the model's tree elsewhere
        self.__dict__.update(original=block, crs=state, sources=sources)
        self.adapter = adapter
        self.parts: BlockParts = adapter.parts(self)
        self.budget_ids = self._budget_products(state)

    def _budget_products(self, state: CRSState) -> dict[str, int]:
        """This block's weight-gradient products in the model's sampling budget (`crs.budget="split"`), by op,
        each registered with its cost (d_in · d_out summed over its linears); {} without a budget."""
        if state.budget is None:
            return {}
        parts = self.parts
        products = {"fc2": [parts.fc2], "fc1": parts.fc1}
        if "lean_block" in state.targets:
            products |= {"proj": [parts.proj], "qkv": parts.qkv}
        cost = {op: sum(lin.in_features * lin.out_features for lin in lins) for op, lins in products.items()}
        return {op: state.budget.add(c) for op, c in cost.items()}

    def restore(self) -> nn.Module:
        """The original block, holding this block's current submodules, parameters and settings."""
        block = self.original
        block._modules.update(self._modules)
        block._parameters.update(self._parameters)
        block._buffers.update(self._buffers)
        for key in ("gradient_checkpointing", "_gradient_checkpointing_func"):
            if key in self.__dict__:
                block.__dict__[key] = self.__dict__[key]
        block.training = self.training
        return block

    def extra_repr(self) -> str:
        return f"{type(self.original).__name__} ({self.adapter.name})"

    def forward(self, *args, **kwargs):
        state = self.crs
        targets = state.targets
        if not state.enabled or (state.config.exact and "mlp" not in targets):
            return self._checkpointed(self._plain, args, kwargs)
        x, mask = self.adapter.hidden_states(args, kwargs)
        if "lean_block" in targets:
            keep_mid = state.config.keep_mid and not (self.gradient_checkpointing and self.training)
            return lean_block(self, x, mask, keep_mid, state.config.kept_dtype)
        return self._checkpointed(self._sampled, (x, mask), {})

    def _checkpointed(self, fn, args: tuple, kwargs: dict):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(partial(fn, **kwargs), *args)
        return fn(*args, **kwargs)

    def _plain(self, *args, **kwargs):
        return _unwrapped(type(self.original).forward)(self, *args, **kwargs)

    # -- the block written out from its parts, targeted ops sampled ----------------------------------------
    def _sampled(self, x: Tensor, mask: Tensor | None) -> Tensor:
        parts, targets, adapter = self.parts, set(self.crs.targets), self.adapter
        cfg, generator = self.crs.config, self.crs.generator.for_device(x.device)
        if targets & ATTENTION_TARGETS:
            qkv = self._project(parts.norm1(x), generator)
            ctx = adapter.attend(self, qkv, mask, self._matmuls(generator))
            proj = parts.proj
            if "attn_output" in targets:
                out = crs_linear(ctx, proj.weight, proj.bias, cfg, self.sources["attn_output"], generator)
            else:
                out = proj(ctx)
            x1 = x + chain(parts.post_attention, out)
        else:
            x1 = x + adapter.attention_branch(self, x, mask)
        if "mlp" in targets:
            return x1 + lean_mlp(self, x1, cfg.kept_dtype)
        if not targets & {"fc1", "fc2"}:
            return x1 + adapter.mlp_branch(self, x1)
        h = parts.norm2(x1)
        if "fc1" in targets:
            w, b = [lin.weight for lin in parts.fc1], [lin.bias for lin in parts.fc1]
            u = crs_linear_shared(h, w, b, cfg, self.sources["fc1"], generator)
        else:
            u = [lin(h) for lin in parts.fc1]
        hidden = chain(parts.pre_fc2, parts.hidden(u))
        fc2 = parts.fc2
        if "fc2" in targets:
            m = crs_linear(hidden, fc2.weight, fc2.bias, cfg, self.sources["fc2"], generator)
        else:
            m = fc2(hidden)
        return x1 + chain(parts.post_mlp, m)

    def _project(self, h: Tensor, generator) -> list[Tensor]:
        """The q/k/v projections of h (`BlockParts.qkv` order), the targeted ones sharing one sample."""
        linears, cfg = self.parts.qkv, self.crs.config
        if self.parts.fused_qkv:
            names = ["qkv"] if set(self.crs.targets) & set(QKV_TARGETS) else []
        else:
            names = [t for t in QKV_TARGETS if t in self.crs.targets]
        by_name = dict(zip(["qkv"] if self.parts.fused_qkv else QKV_TARGETS, linears, strict=True))
        sampled = {}
        if names:
            weights, biases = [by_name[n].weight for n in names], [by_name[n].bias for n in names]
            outs = crs_linear_shared(h, weights, biases, cfg, self.sources["qkv"], generator)
            sampled = dict(zip(names, outs, strict=True))
        return [sampled[n] if n in sampled else lin(h) for n, lin in by_name.items()]

    def _matmuls(self, generator) -> SampledMatmuls | None:
        targets, cfg, sources = self.crs.targets, self.crs.config, self.sources
        if not set(targets) & set(MATMUL_TARGETS):
            return None
        matmuls = SampledMatmuls()
        if "scores" in targets:
            norms = (sources["scores_m"], sources["scores_n"])
            matmuls.scores = lambda q, kt: crs_matmul(q, kt, cfg, False, norms, generator)
        if "context" in targets:
            side = (None, sources["context_n"])
            matmuls.context = lambda p, v, kept: crs_matmul(p, v, cfg, kept, side, generator)
        return matmuls
