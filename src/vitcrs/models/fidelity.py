"""The gradient-fidelity metric: how far a sampled gradient of a classifier (any model family) lies from the
exact gradient of the same batch, and which block and kind each of its parameters is.

One definition, used by the meter (`python -m vitcrs.fidelity`) and the training callback
(`vitcrs.callbacks.GradFidelityMonitor`):

    rel_err = ‖ĝ − g‖² / ‖g‖²        cos = ĝ·g / (‖ĝ‖ ‖g‖)

over every trainable parameter except the classifier head (`measured_parameters`). The head is left out
because CRS never samples it (its gradient is exact) and, fresh per task, it dominates ‖g‖² early in
fine-tuning, which would hide the encoder's error. Sums are accumulated in float64.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .registry import head_prefixes

# Columns of `parameter_sums`: ‖ĝ_i − g_i‖², ĝ_i·g_i, ‖ĝ_i‖², ‖g_i‖² per parameter i.
SQ_ERR, DOT, SQ_SAMPLED, SQ_EXACT = range(4)

# Parameter kinds, in table order: what a parameter's name ends in, for every model family: transformers 5
# ViT / DeiT / DINOv2 (q_proj ... o_proj; DINOv2's SwiGLU gate_proj and up_proj are its fc1, down_proj its
# fc2) and timm (one fused qkv, attn.proj, mlp.fc1 / fc2, norm1 / norm2, layer scales ls1 / ls2).
KINDS = ("query", "key", "value", "qkv", "attn_output", "fc1", "fc2", "layernorm", "layer_scale",
         "embeddings", "other")  # fmt: skip
_KIND_PATTERNS = (
    (
        "embeddings",
        re.compile(r"(^|\.)embeddings\.|^(cls_token|reg_token|dist_token|pos_embed|patch_embed\.)"),
    ),
    ("query", re.compile(r"\.q_proj\.")),
    ("key", re.compile(r"\.k_proj\.")),
    ("value", re.compile(r"\.v_proj\.")),
    ("qkv", re.compile(r"\.attn\.qkv\.")),
    ("attn_output", re.compile(r"\.o_proj\.|\.attn\.proj\.")),
    ("fc1", re.compile(r"\.fc1\.|\.gate_proj\.|\.up_proj\.")),
    ("fc2", re.compile(r"\.fc2\.|\.down_proj\.")),
    ("layernorm", re.compile(r"(^|\.)(layernorm\w*|norm\w*|fc_norm|[qk]_norm)\.")),
    ("layer_scale", re.compile(r"\.(ls\d|layer_scale\d)\.")),
)
_BLOCK = re.compile(r"(^|\.)(layers|layer|blocks)\.(\d+)\.")  # HF ViT/DeiT, HF DINOv2, timm
EMBEDDINGS_BLOCK = "embeddings"
FINAL_BLOCK = "final norm"


def measured_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every trainable parameter of a classifier of any model family except its head
    (`vitcrs.models.head_prefixes`), in order."""
    head = head_prefixes(model)
    return [
        (name, p) for name, p in model.named_parameters() if p.requires_grad and not name.startswith(head)
    ]


def parameter_kind(name: str) -> str:
    """The kind of a ViT parameter (any family): one of KINDS ("other" for names the patterns do not know)."""
    return next((kind for kind, pattern in _KIND_PATTERNS if pattern.search(name)), "other")


def parameter_block(name: str) -> str:
    """Where a ViT parameter sits: "embeddings", the encoder block's index ("0", "1", ...) or "final norm"."""
    if _KIND_PATTERNS[0][1].search(name):
        return EMBEDDINGS_BLOCK
    found = _BLOCK.search(name)
    return found.group(3) if found else FINAL_BLOCK


@torch.no_grad()
def parameter_sums(sampled: Sequence[Tensor | None], exact: Sequence[Tensor | None]) -> Tensor:
    """float64 [n, 4]: per parameter ‖ĝ_i − g_i‖², ĝ_i·g_i, ‖ĝ_i‖², ‖g_i‖² (None counts as zeros)."""
    if len(sampled) != len(exact):
        raise ValueError(f"{len(sampled)} sampled gradients for {len(exact)} exact ones")
    rows = []
    for s, e in zip(sampled, exact, strict=True):
        ref = s if s is not None else e
        if ref is None:
            rows.append(torch.zeros(4, dtype=torch.float64))
            continue
        s64 = (s if s is not None else torch.zeros_like(ref)).double()
        e64 = (e if e is not None else torch.zeros_like(ref)).double()
        rows.append(torch.stack([(s64 - e64).square().sum(), (s64 * e64).sum(), s64.square().sum(),
                                 e64.square().sum()]).cpu())  # fmt: skip
    return torch.stack(rows) if rows else torch.zeros(0, 4, dtype=torch.float64)


def rel_err_and_cos(sums: Tensor) -> tuple[float, float]:
    """(rel_err, cos) of the parameters whose `parameter_sums` rows are given ([n, 4] or one summed [4]).

    An exact gradient of zero gives nan for both (nothing to compare with).
    """
    total = sums.reshape(-1, 4).sum(0)
    sq_exact, sq_sampled = float(total[SQ_EXACT]), float(total[SQ_SAMPLED])
    rel_err = float(total[SQ_ERR]) / sq_exact if sq_exact > 0 else float("nan")
    denom = (sq_sampled * sq_exact) ** 0.5
    cos = float(total[DOT]) / denom if denom > 0 else float("nan")
    return rel_err, cos


def grad_fidelity(sampled: Sequence[Tensor | None], exact: Sequence[Tensor | None]) -> tuple[float, float]:
    """(rel_err, cos) of sampled vs exact gradients, given per parameter (e.g. of `measured_parameters`)."""
    return rel_err_and_cos(parameter_sums(sampled, exact))
