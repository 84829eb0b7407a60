"""Column-row sampled backward passes (CRS, WTA-CRS) and their injection into Hugging Face ViTs.

cfg = CRSConfig(ratio=0.3, method="wta_crs")
y = crs_linear(x, weight, bias, cfg)     # == F.linear(x, weight, bias); grad of weight sampled
z = crs_matmul(a, b, cfg)                # == a @ b; both input grads sampled
model = inject(model, CRSConfig(ratio=0.3, targets=TARGET_SETS["study"]))  # a named set, or any names
model.crs_generator.manual_seed(0)      # the model's own sampling stream (unseeded: torch's global RNG)
"""

from .block import lean_vit_block
from .config import CACHE_FORMATS, CACHE_WARMUPS, METHODS, PROBS, CRSConfig
from .functional import crs_linear, crs_linear_shared, crs_matmul, crs_mlp
from .generator import SamplingGenerator
from .grad_norm import GradNormEMA
from .inject import (
    CRSLinear,
    CRSViTAttention,
    CRSViTLayer,
    CRSViTMLP,
    LeanViTLayer,
    inject,
    uninjected,
)
from .memory import SavedTensorsMeter, vit_block_saved_bytes
from .sample_cache import (
    SampleGradCache,
    attach_sample_cache,
    grad_norm_sources,
    sample_cache_bytes_per_image,
    sample_cache_nbytes,
    sample_caches,
    set_training_batch,
    training_batch,
)
from .targets import (
    ALL_TARGETS,
    BLOCK_TARGETS,
    KNOWN_TARGETS,
    LEAN_TARGETS,
    LINEAR_TARGETS,
    MATMUL_TARGETS,
    QKV_TARGETS,
    TARGET_SETS,
    target_set,
    validate_targets,
)

__all__ = [
    "ALL_TARGETS",
    "BLOCK_TARGETS",
    "CACHE_FORMATS",
    "CACHE_WARMUPS",
    "KNOWN_TARGETS",
    "LEAN_TARGETS",
    "LINEAR_TARGETS",
    "MATMUL_TARGETS",
    "METHODS",
    "PROBS",
    "QKV_TARGETS",
    "TARGET_SETS",
    "CRSConfig",
    "CRSLinear",
    "CRSViTAttention",
    "CRSViTLayer",
    "CRSViTMLP",
    "GradNormEMA",
    "LeanViTLayer",
    "SampleGradCache",
    "SamplingGenerator",
    "SavedTensorsMeter",
    "attach_sample_cache",
    "crs_linear",
    "crs_linear_shared",
    "crs_matmul",
    "crs_mlp",
    "grad_norm_sources",
    "inject",
    "lean_vit_block",
    "sample_cache_bytes_per_image",
    "sample_cache_nbytes",
    "sample_caches",
    "set_training_batch",
    "target_set",
    "training_batch",
    "uninjected",
    "validate_targets",
    "vit_block_saved_bytes",
]
