"""The networks of every model family (`vitcrs.models.registry`: Hugging Face ViT / DeiT / DINOv2, timm ViT)
behind one interface (`ModelFamily`), and the LightningModule training them (`ViTClassifier`)."""

from .family import Architecture, ModelFamily, check_architecture, parameter_shapes
from .hf import (
    ATTN_IMPLEMENTATIONS,
    build_vit,
    check_attn_implementation,
    load_vit_config,
    model_inputs,
    vit_logits,
)
from .module import ViTClassifier
from .optim import OptimConfig
from .registry import (
    DEFAULT_FAMILY,
    FAMILIES,
    family_of,
    head_prefixes,
    model_family,
    model_label,
    model_logits,
    named_family,
)

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "DEFAULT_FAMILY",
    "FAMILIES",
    "Architecture",
    "ModelFamily",
    "OptimConfig",
    "ViTClassifier",
    "build_vit",
    "check_architecture",
    "check_attn_implementation",
    "family_of",
    "head_prefixes",
    "load_vit_config",
    "model_family",
    "model_inputs",
    "model_label",
    "model_logits",
    "named_family",
    "parameter_shapes",
    "vit_logits",
]
