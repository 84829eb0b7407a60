"""Block adapters: one per family of ViT encoder blocks (see `base.BlockAdapter`).

| adapter | blocks |
| --- | --- |
| `HFViTAdapter` | transformers `ViTLayer`, `DeiTLayer` |
| `HFDinov2Adapter` | transformers `Dinov2Layer` (MLP or SwiGLU MLP) |
| `TimmViTAdapter` | timm `vision_transformer.Block` |

`adapter_for(module)` finds a module's adapter; a new family is one module here plus a line in `ADAPTERS`.
"""

from __future__ import annotations

from torch import nn

from .base import BlockAdapter, BlockParts, SampledMatmuls, eager_attention
from .hf_dinov2 import HFDinov2Adapter
from .hf_vit import HFViTAdapter
from .timm_vit import TimmViTAdapter

ADAPTERS: tuple[BlockAdapter, ...] = (HFViTAdapter(), HFDinov2Adapter(), TimmViTAdapter())


def adapter_for(module: nn.Module) -> BlockAdapter | None:
    """The adapter whose family `module` is a block of, or None."""
    return next((a for a in ADAPTERS if a.matches(module)), None)


__all__ = [
    "ADAPTERS",
    "BlockAdapter",
    "BlockParts",
    "HFDinov2Adapter",
    "HFViTAdapter",
    "SampledMatmuls",
    "TimmViTAdapter",
    "adapter_for",
    "eager_attention",
]
