"""Column-row sampled backward passes (CRS, WTA-CRS) and their injection into ViTs of any supported family.

cfg = CRSConfig(ratio=0.3, method="wta_crs")
y = crs_linear(x, weight, bias, cfg)     # == F.linear(x, weight, bias); grad of weight sampled
z = crs_matmul(a, b, cfg)                # == a @ b; both input grads sampled
model = inject(model, CRSConfig(ratio=0.3))   # HF ViT/DeiT/DINOv2 or timm ViT; default: lean_block
crs_state(model).generator.manual_seed(0)     # the model's own sampling stream (unseeded: torch's global RNG)
"""

from .adapters import ADAPTERS, BlockAdapter, BlockParts, adapter_for
from .block import CRSBlock
from .budget import SamplingBudget
from .config import BUDGETS, CACHE_FORMATS, CACHE_WARMUPS, METHODS, PROBS, CRSConfig
from .functional import crs_linear, crs_linear_shared, crs_matmul
from .generator import SamplingGenerator
from .grad_norm import GradNormEMA
from .inject import find_blocks, inject, uninjected
from .lean import lean_block, lean_mlp, sampled_weight_grad
from .memory import SavedTensorsMeter, vit_block_saved_bytes
from .sample_cache import SampleGradCache, sample_cache_bytes_per_image
from .state import (
    CRSState,
    attach_sample_cache,
    crs_state,
    grad_norm_sources,
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
    "ADAPTERS",
    "ALL_TARGETS",
    "BLOCK_TARGETS",
    "BUDGETS",
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
    "BlockAdapter",
    "BlockParts",
    "CRSBlock",
    "CRSConfig",
    "CRSState",
    "GradNormEMA",
    "SampleGradCache",
    "SamplingBudget",
    "SamplingGenerator",
    "SavedTensorsMeter",
    "adapter_for",
    "attach_sample_cache",
    "crs_linear",
    "crs_linear_shared",
    "crs_matmul",
    "crs_state",
    "find_blocks",
    "grad_norm_sources",
    "inject",
    "lean_block",
    "lean_mlp",
    "sample_cache_bytes_per_image",
    "sample_cache_nbytes",
    "sample_caches",
    "sampled_weight_grad",
    "set_training_batch",
    "target_set",
    "training_batch",
    "uninjected",
    "validate_targets",
    "vit_block_saved_bytes",
]
