"""Column-row sampled backward passes (CRS, WTA-CRS) and their injection into Hugging Face ViTs.

cfg = CRSConfig(ratio=0.3, method="wta_crs")
y = crs_linear(x, weight, bias, cfg)     # == F.linear(x, weight, bias); grad of weight sampled
z = crs_matmul(a, b, cfg)                # == a @ b; both input grads sampled
model = inject(model, cfg, targets=["query", "key", "value", "scores", "context"])
"""

from . import random
from .block import lean_vit_block
from .config import METHODS, PROBS, CRSConfig
from .functional import crs_linear, crs_linear_shared, crs_matmul, crs_mlp
from .grad_norm import GradNormEMA
from .inject import (
    ALL_TARGETS,
    BLOCK_TARGETS,
    DEFAULT_TARGETS,
    KNOWN_TARGETS,
    LEAN_TARGETS,
    LINEAR_TARGETS,
    MATMUL_TARGETS,
    CRSLinear,
    CRSViTAttention,
    CRSViTLayer,
    CRSViTMLP,
    LeanViTLayer,
    crs_state_dict,
    inject,
    load_crs_state_dict,
    uninjected,
    validate_targets,
)
from .memory import SavedTensorsMeter, vit_block_saved_bytes

__all__ = [
    "ALL_TARGETS",
    "BLOCK_TARGETS",
    "DEFAULT_TARGETS",
    "KNOWN_TARGETS",
    "LEAN_TARGETS",
    "LINEAR_TARGETS",
    "MATMUL_TARGETS",
    "METHODS",
    "PROBS",
    "CRSConfig",
    "CRSLinear",
    "CRSViTAttention",
    "CRSViTLayer",
    "CRSViTMLP",
    "GradNormEMA",
    "LeanViTLayer",
    "SavedTensorsMeter",
    "crs_linear",
    "crs_linear_shared",
    "crs_matmul",
    "crs_mlp",
    "crs_state_dict",
    "inject",
    "lean_vit_block",
    "load_crs_state_dict",
    "random",
    "uninjected",
    "validate_targets",
    "vit_block_saved_bytes",
]
