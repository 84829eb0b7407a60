"""timm `VisionTransformer` encoder blocks (`timm.models.vision_transformer.Block`).

    x1 = x  + drop_path1(ls1(proj_drop(proj(norm(attention(qkv(norm1(x))))))))
    y  = x1 + drop_path2(ls2(drop2(fc2(norm(drop1(act(fc1(norm2(x1)))))))))

qkv is one fused linear (q|k|v), followed by the optional qk-norms (`qk_norm=True`); `ls1`/`ls2` are layer
scales (`init_values`), `drop_path1`/`drop_path2` stochastic depth (`drop_path_rate`); the dropouts are
`proj_drop_rate` and `attn_drop_rate`. The attention runs `F.scaled_dot_product_attention` (timm's fused
attention, `attn.fused_attn`) or explicit matmuls (samplable; timm scales q before Q Kᵀ).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BlockAdapter, BlockParts, SampledMatmuls, eager_attention


class TimmViTAdapter(BlockAdapter):
    """timm's `Block` with its `Attention` and `Mlp`."""

    name = "timm ViT"
    eager_hint = (
        "Turn timm's fused attention off (model.attn_implementation=eager in vitcrs, or "
        "`for m in model.modules(): m.fused_attn = False` on the Attention modules)"
    )
    block_class = "timm.models.vision_transformer.Block"

    def matches(self, module: nn.Module) -> bool:
        return f"{type(module).__module__}.{type(module).__qualname__}" == self.block_class

    def parts(self, block: nn.Module) -> BlockParts:
        attn, mlp = block.attn, block.mlp
        return BlockParts(
            norm1=block.norm1,
            qkv=[attn.qkv],
            proj=attn.proj,
            post_attention=[attn.proj_drop, block.ls1, block.drop_path1],
            norm2=block.norm2,
            fc1=[mlp.fc1],
            act=mlp.act,
            pre_fc2=[mlp.drop1, mlp.norm],
            fc2=mlp.fc2,
            post_mlp=[mlp.drop2, block.ls2, block.drop_path2],
            heads=attn.num_heads,
            head_dim=attn.head_dim,
            eager=not attn.fused_attn,
            attn_core_params=[p for m in (attn.q_norm, attn.k_norm, attn.norm) for p in m.parameters()],
        )

    def check_targets(self, block: nn.Module, targets: Iterable[str]) -> None:
        mlp = block.mlp
        if getattr(block.attn, "gate", None) is not None:
            raise ValueError("inject does not support timm Attention with gated=True (an output gate).")
        if not all(hasattr(mlp, n) for n in ("fc1", "act", "drop1", "norm", "fc2", "drop2")):
            raise ValueError(
                f"inject supports timm blocks with timm's Mlp, not {type(mlp).__name__}: add an adapter "
                "for it (docs/crs.md, 'Adding a model family')."
            )
        super().check_targets(block, targets)

    def hidden_states(self, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None]:
        x = args[0] if args else kwargs["x"]
        if kwargs.get("is_causal") or (len(args) > 2 and args[2]):
            raise ValueError("vitcrs CRS blocks run bidirectional attention: is_causal is not supported")
        return x, args[1] if len(args) > 1 else kwargs.get("attn_mask")

    def attention_branch(self, block: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
        return block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=mask)))

    def mlp_branch(self, block: nn.Module, x1: Tensor) -> Tensor:
        return block.drop_path2(block.ls2(block.mlp(block.norm2(x1))))

    def attention_dropout(self, block: nn.Module) -> float:
        return block.attn.attn_drop.p if block.attn.training else 0.0

    def attend(
        self, block: nn.Module, qkv: Sequence[Tensor], mask: Tensor | None, sampled: SampledMatmuls | None
    ) -> Tensor:
        attn = block.attn
        (fused,) = qkv
        b, n, _ = fused.shape
        q, k, v = fused.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        dropout = attn.attn_drop.p if attn.training else 0.0
        if sampled is None and attn.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            if mask is not None and mask.dtype == torch.bool:
                mask = mask.new_zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
            x = eager_attention(q, k, v, mask, attn.scale, dropout, sampled, True, False)
        return attn.norm(x.transpose(1, 2).reshape(b, n, -1))
