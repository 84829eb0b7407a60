"""The network (`build_vit`, `model_inputs`) and its LightningModule (`ViTClassifier`)."""

from .module import ViTClassifier
from .optim import OptimConfig
from .hf import (
    ATTN_IMPLEMENTATIONS,
    ModelInputs,
    build_vit,
    check_attn_implementation,
    load_vit_config,
    model_inputs,
    parameter_shapes,
    vit_logits,
)

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "ModelInputs",
    "OptimConfig",
    "ViTClassifier",
    "build_vit",
    "check_attn_implementation",
    "load_vit_config",
    "model_inputs",
    "parameter_shapes",
    "vit_logits",
]
