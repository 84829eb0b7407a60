"""`inject`: put CRS into every encoder block of a Hugging Face ViT, keeping weights and state_dict keys.

Linear targets swap the class of the existing `nn.Linear` (same parameters); attention targets swap the class
of `ViTAttention` to one whose forward shares one sample of the block input between q, k and v and, for the
matmul targets, runs eager attention with `crs_matmul`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.vit.modeling_vit import (
    ALL_ATTENTION_FUNCTIONS,
    ViTAttention,
    ViTLayer,
    ViTMLP,
    eager_attention_forward,
)

from .block import lean_vit_block
from .config import CRSConfig
from .functional import crs_linear, crs_linear_shared, crs_matmul, crs_mlp
from .generator import SamplingGenerator
from .grad_norm import GradNormEMA
from .sample_cache import GradNormSource, SampleGradCache, TrainingBatch
from .targets import KNOWN_TARGETS, MATMUL_TARGETS, QKV_TARGETS, validate_targets

_QKV_ATTRS = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}


class CRSLinear(nn.Linear):
    """An `nn.Linear` whose weight gradient is column-row sampled (`crs_linear`)."""

    crs_config: CRSConfig
    crs_generator: SamplingGenerator
    grad_norm: GradNormSource

    def forward(self, x: Tensor) -> Tensor:
        generator = self.crs_generator.for_device(x.device)
        return crs_linear(x, self.weight, self.bias, self.crs_config, self.grad_norm, generator)


class CRSViTAttention(ViTAttention):
    """ViT self-attention with sampled q/k/v projections (one shared sample) and/or attention matmuls.

    grad_norm: the sources of the q/k/v projections ("qkv"), of both sides of the scores matmul ("scores_m",
    "scores_n") and of the context matmul's V side ("context_n")."""

    crs_config: CRSConfig
    crs_generator: SamplingGenerator
    crs_targets: frozenset[str]
    grad_norm: nn.ModuleDict

    def _project(self, x: Tensor) -> list[Tensor]:
        names = [t for t in QKV_TARGETS if t in self.crs_targets]
        mods = {t: getattr(self, _QKV_ATTRS[t]) for t in QKV_TARGETS}
        sampled = (
            crs_linear_shared(
                x,
                [mods[t].weight for t in names],
                [mods[t].bias for t in names],
                self.crs_config,
                self.grad_norm["qkv"],
                self.crs_generator.for_device(x.device),
            )
            if names
            else ()
        )
        out = dict(zip(names, sampled, strict=True))
        return [out[t] if t in out else mods[t](x) for t in QKV_TARGETS]

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Eager attention (as transformers' `eager_attention_forward`) with the targeted matmuls sampled."""
        cfg, norms, generator = self.crs_config, self.grad_norm, self.crs_generator.for_device(q.device)
        kt = k.transpose(2, 3)
        if "scores" in self.crs_targets:
            scores = crs_matmul(q, kt, cfg, False, (norms["scores_m"], norms["scores_n"]), generator)
        else:
            scores = torch.matmul(q, kt)
        scores = scores * self.scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        dropout = self.attention_dropout if self.training else 0.0
        if "context" in self.crs_targets:
            # softmax keeps its output for its own backward, so the context matmul reuses it (keep_a) rather
            # than storing a sample or a cast copy of it; only V is sampled. That needs P as it is: no
            # dropout, and a dtype the matmul takes (autocast casts it; a bf16/fp16 model needs the copy).
            autocast = torch.is_autocast_enabled(q.device.type)
            kept = dropout == 0.0 and (autocast or probs.dtype == q.dtype)
            p = probs if kept else probs.to(q.dtype)
            if dropout > 0.0:
                p = F.dropout(p, p=dropout, training=True)
            context = crs_matmul(p, v, cfg, kept, (None, norms["context_n"]), generator)
            probs = probs.to(q.dtype)
        else:
            probs = F.dropout(probs.to(q.dtype), p=dropout, training=self.training)
            context = torch.matmul(probs, v)
        return context.transpose(1, 2).contiguous(), probs

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = (t.view(hidden_shape).transpose(1, 2) for t in self._project(hidden_states))
        if self.crs_targets & set(MATMUL_TARGETS):
            attn_output, attn_weights = self._attend(q, k, v, attention_mask)
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            attn_output, attn_weights = attention(
                self,
                q,
                k,
                v,
                attention_mask,
                dropout=0.0 if not self.training else self.attention_dropout,
                scaling=self.scaling,
                **kwargs,
            )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class CRSViTMLP(ViTMLP):
    """ViT MLP that stores only its input (given `norm`: that norm's input) for backward and recomputes the
    hidden activation there (`crs_mlp`)."""

    crs_config: CRSConfig
    crs_generator: SamplingGenerator

    def forward(self, hidden_states: Tensor, norm: nn.LayerNorm | None = None) -> Tensor:
        """`self(norm(hidden_states))`, keeping only `hidden_states` for backward (norm: None = none)."""
        fc1, fc2 = self.fc1, self.fc2
        generator = self.crs_generator.for_device(hidden_states.device)
        params = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        return crs_mlp(hidden_states, *params, self.activation_fn, self.crs_config, norm, generator)


class CRSViTLayer(ViTLayer):
    """ViT encoder block whose lean MLP (`CRSViTMLP`) also recomputes the LayerNorm before it, so the
    block's second half keeps only its input (the residual stream) for backward. Same math as `ViTLayer`."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states, _ = self.attention(hidden_states, attention_mask, **kwargs)
        hidden_states = self.dropout(hidden_states) + residual
        mlp_output = self.mlp(hidden_states, norm=self.layernorm_after)
        return self.dropout(mlp_output) + hidden_states


class LeanViTLayer(ViTLayer):
    """ViT encoder block run as one op that keeps only the residual stream for backward (`lean_vit_block`).

    Under Hugging Face gradient checkpointing (`gradient_checkpointing_enable()`) it is not wrapped in a
    checkpoint, since it recomputes in backward itself; it then keeps only its input, as a checkpointed block
    does, and its recomputation samples the weight gradients. Same math as `ViTLayer` without dropout. At
    ratio 1 it is the plain `ViTLayer` (exact op, no recomputation).
    """

    crs_config: CRSConfig
    crs_generator: SamplingGenerator

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        if self.crs_config.exact:  # ratio 1: the plain block at its speed, checkpointed as HF does it
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                plain = partial(_PLAIN_LAYER_FORWARD, self, **kwargs)
                return self._gradient_checkpointing_func(plain, hidden_states, attention_mask)
            return _PLAIN_LAYER_FORWARD(self, hidden_states, attention_mask, **kwargs)
        keep_mid = not (self.gradient_checkpointing and self.training)
        generator = self.crs_generator.for_device(hidden_states.device)
        return lean_vit_block(self, hidden_states, self.crs_config, attention_mask, keep_mid, generator)


# transformers wraps each GradientCheckpointingLayer's forward in its checkpoint; the lean block replaces that
# (and checkpoints the plain block itself at ratio 1, since the wrapper only acts as the outermost forward)
LeanViTLayer.forward = LeanViTLayer.forward.__wrapped__  # type: ignore[attr-defined]
_PLAIN_LAYER_FORWARD = ViTLayer.forward.__wrapped__  # type: ignore[attr-defined]


def _check_no_dropout(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        p = getattr(config, key, 0.0) or 0.0
        if p > 0:
            raise ValueError(
                f"crs.targets 'lean_block' recomputes each block in backward and needs no dropout, but the "
                f"model config has {key}={p}. Set it to 0, or use the 'lean' target set instead."
            )


def _vit_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder blocks of a ViT model, ViTModel or ViTForImageClassification."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "attention", None), ViTAttention)]
    if not layers:
        raise ValueError(f"inject found no ViT encoder blocks in {type(model).__name__}.")
    return layers


def inject(
    model: nn.Module,
    crs_config: CRSConfig,
    targets: Iterable[str] | None = None,
    generator: SamplingGenerator | None = None,
) -> nn.Module:
    """Sample the backward pass of the `targets` ops (None: `crs_config.targets`) in every encoder block of a
    HF ViT; returns `model`.

    Targets: linear "query", "key", "value", "attn_output", "fc1", "fc2"; matmul "scores" (Q Kᵀ) and
    "context" (P V), which need eager attention; "mlp", the memory-lean MLP (`crs_mlp`: keeps only the input
    of the LayerNorm before the MLP, recomputes that norm and the hidden activation in backward; replaces
    "fc1"/"fc2"); "lean_block", the whole block as one op keeping only the residual stream (`lean_vit_block`;
    stands alone, needs no dropout). Every injected module holds `crs_config` and the one `crs_generator`
    (`generator`, else the model's from an earlier call, else a new unseeded one; also `model.crs_generator`);
    the gradient-norm sources are `grad_norm` submodules of the modules that use them, their estimates
    non-persistent buffers, so parameters and state_dict keys are unchanged. Calling it again replaces the
    settings. With ratio 1 the numerics equal the uninjected model's.
    """
    config = getattr(model, "config", None)
    targets = crs_config.targets if targets is None else targets
    targets = frozenset(validate_targets(targets, getattr(config, "_attn_implementation", None)))
    if "lean_block" in targets and not crs_config.exact:  # at ratio 1 the block is the plain one
        _check_no_dropout(model)
    generator = generator or getattr(model, "crs_generator", None) or SamplingGenerator()
    # prob="sample_cache": one cache per sampled op, all reading the batch indices from one TrainingBatch
    batch = TrainingBatch() if crs_config.prob == "sample_cache" else None

    def source() -> GradNormSource:
        if batch is not None:
            return SampleGradCache(batch, crs_config.cache_format, crs_config.grad_ema)
        return GradNormEMA(crs_config.grad_ema)

    for layer in _vit_layers(model):
        attn = layer.attention
        sampled_attn = bool(targets & {*QKV_TARGETS, *MATMUL_TARGETS})
        attn.__class__ = CRSViTAttention if sampled_attn else ViTAttention
        attn.crs_targets = targets
        keys = ("qkv", "scores_m", "scores_n", "context_n")
        attn.grad_norm = nn.ModuleDict({k: source() for k in keys}) if sampled_attn else None
        for name, linear in (("attn_output", attn.o_proj), ("fc1", layer.mlp.fc1), ("fc2", layer.mlp.fc2)):
            linear.__class__ = CRSLinear if name in targets else nn.Linear
            linear.grad_norm = source() if name in targets else None
        layer.mlp.__class__ = CRSViTMLP if "mlp" in targets else ViTMLP
        for mod in (layer, attn, attn.o_proj, layer.mlp, layer.mlp.fc1, layer.mlp.fc2):
            mod.crs_config, mod.crs_generator = crs_config, generator
        if type(layer) in (ViTLayer, CRSViTLayer, LeanViTLayer):  # other block classes keep their forward
            lean = LeanViTLayer if "lean_block" in targets else None
            layer.__class__ = lean or (CRSViTLayer if "mlp" in targets else ViTLayer)
        elif "lean_block" in targets:
            raise ValueError(f"crs.targets 'lean_block' needs ViTLayer blocks, not {type(layer).__name__}.")
    model.crs_generator = generator
    model.crs_targets = tuple(t for t in KNOWN_TARGETS if t in targets)
    model.crs_training_batch = batch  # see vitcrs.crs.sample_cache.set_training_batch
    return model


_PLAIN = {
    CRSLinear: nn.Linear,
    CRSViTAttention: ViTAttention,
    CRSViTMLP: ViTMLP,
    CRSViTLayer: ViTLayer,
    LeanViTLayer: ViTLayer,
}


@contextmanager
def uninjected(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as the plain, exact HF model inside the block (e.g. to measure the exact baseline)."""
    swapped = [(m, type(m)) for m in model.modules() if type(m) in _PLAIN]
    for m, cls in swapped:
        m.__class__ = _PLAIN[cls]
    try:
        yield model
    finally:
        for m, cls in swapped:
            m.__class__ = cls
