"""Hugging Face DINOv2 encoder blocks (`Dinov2Layer`): layer scale, drop path, and an MLP or a SwiGLU MLP.

    x1 = x  + drop_path(layer_scale1(o_proj(attention(q_proj, k_proj, v_proj of norm1(x)))))
    y  = x1 + drop_path(layer_scale2(mlp(norm2(x1))))

mlp: fc2(act(fc1(·))) (`Dinov2MLP`) or down_proj(silu(gate_proj(·)) · up_proj(·)) (`Dinov2SwiGLUFFN`, a gated
MLP: gate and up share one sample of their input). The attention is the transformers one (see `hf_vit`).
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import BlockParts
from .hf_vit import HFAttentionAdapter


class HFDinov2Adapter(HFAttentionAdapter):
    """transformers' `Dinov2Layer`."""

    name = "Hugging Face DINOv2"
    layer_classes = ("transformers.models.dinov2.modeling_dinov2.Dinov2Layer",)

    def parts(self, block: nn.Module) -> BlockParts:
        attn, mlp = block.attention, block.mlp
        if hasattr(mlp, "gate_proj"):  # Dinov2SwiGLUFFN
            fc1, act, fc2 = [mlp.gate_proj, mlp.up_proj], mlp.act_fn, mlp.down_proj
        else:
            fc1, act, fc2 = [mlp.fc1], mlp.activation_fn, mlp.fc2
        return BlockParts(
            norm1=block.norm1,
            qkv=[attn.q_proj, attn.k_proj, attn.v_proj],
            proj=attn.o_proj,
            post_attention=[block.layer_scale1, block.drop_path],
            norm2=block.norm2,
            fc1=fc1,
            act=act,
            pre_fc2=[],
            fc2=fc2,
            post_mlp=[block.layer_scale2, block.drop_path],
            heads=attn.config.num_attention_heads,
            head_dim=attn.head_dim,
            eager=attn.config._attn_implementation == "eager",
        )

    def attention_branch(self, block: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
        out, _ = block.attention(block.norm1(x), attention_mask=mask)
        return block.drop_path(block.layer_scale1(out))

    def mlp_branch(self, block: nn.Module, x1: Tensor) -> Tensor:
        return block.drop_path(block.layer_scale2(block.mlp(block.norm2(x1))))
