"""Hugging Face ViT and DeiT encoder blocks (`ViTLayer`, `DeiTLayer`: the same block under two names).

    x1 = x  + dropout(o_proj(attention(q_proj, k_proj, v_proj of layernorm_before(x))))
    y  = x1 + dropout(fc2(act(fc1(layernorm_after(x1)))))

`dropout` is `hidden_dropout_prob`; the attention applies `attention_probs_dropout_prob` to its probabilities
and runs `config._attn_implementation` (eager, sdpa, ...; only eager has matmuls to sample).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .base import BlockAdapter, BlockParts, SampledMatmuls, eager_attention


class HFAttentionAdapter(BlockAdapter):
    """What the transformers blocks share: q_proj/k_proj/v_proj/o_proj attention run through
    `ALL_ATTENTION_FUNCTIONS`, called as `layer(hidden_states, attention_mask, **kwargs)`."""

    eager_hint = "Set attn_implementation='eager' on the model (model.attn_implementation=eager)"
    layer_classes: tuple[str, ...] = ()

    def matches(self, module: nn.Module) -> bool:
        return f"{type(module).__module__}.{type(module).__qualname__}" in self.layer_classes

    def hidden_states(self, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None]:
        x = args[0] if args else kwargs["hidden_states"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        return x, mask

    @staticmethod
    def _attention(block: nn.Module) -> nn.Module:
        return block.attention

    def attention_dropout(self, block: nn.Module) -> float:
        attn = self._attention(block)
        return attn.attention_dropout if attn.training else 0.0

    def attend(
        self, block: nn.Module, qkv: Sequence[Tensor], mask: Tensor | None, sampled: SampledMatmuls | None
    ) -> Tensor:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.vit.modeling_vit import eager_attention_forward

        attn = self._attention(block)
        lead = qkv[0].shape[:-1]
        q, k, v = (t.view(*lead, -1, attn.head_dim).transpose(1, 2) for t in qkv)
        dropout = attn.attention_dropout if attn.training else 0.0
        if sampled is None:
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                attn.config._attn_implementation, eager_attention_forward
            )
            out, _ = interface(attn, q, k, v, mask, dropout=dropout, scaling=attn.scaling)
        else:
            out = eager_attention(q, k, v, mask, attn.scaling, dropout, sampled, False, True)
            out = out.transpose(1, 2).contiguous()
        return out.reshape(*lead, -1).contiguous()


class HFViTAdapter(HFAttentionAdapter):
    """transformers' `ViTLayer` and `DeiTLayer`."""

    name = "Hugging Face ViT/DeiT"
    layer_classes = (
        "transformers.models.vit.modeling_vit.ViTLayer",
        "transformers.models.deit.modeling_deit.DeiTLayer",
    )

    def parts(self, block: nn.Module) -> BlockParts:
        attn, mlp = block.attention, block.mlp
        return BlockParts(
            norm1=block.layernorm_before,
            qkv=[attn.q_proj, attn.k_proj, attn.v_proj],
            proj=attn.o_proj,
            post_attention=[block.dropout],
            norm2=block.layernorm_after,
            fc1=[mlp.fc1],
            act=mlp.activation_fn,
            pre_fc2=[],
            fc2=mlp.fc2,
            post_mlp=[block.dropout],
            heads=attn.config.num_attention_heads,
            head_dim=attn.head_dim,
            eager=attn.config._attn_implementation == "eager",
        )

    def attention_branch(self, block: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
        return block.dropout(block.attention(block.layernorm_before(x), mask)[0])

    def mlp_branch(self, block: nn.Module, x1: Tensor) -> Tensor:
        return block.dropout(block.mlp(block.layernorm_after(x1)))
