"""`SavedTensorsMeter`: bytes an autograd graph keeps alive between forward and backward."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .config import CRSConfig
from .targets import QKV_TARGETS


class SavedTensorsMeter:
    """Context manager summing the bytes of distinct storages saved for backward inside it.

    Storages of `exclude` tensors (e.g. the model's parameters, which live anyway) are not counted.
    Backward works as usual; a graph dropped without backward is freed.
    A storage saved by several ops (e.g. a shared input) counts once. Read `.bytes` after the block, while
    the graph is still alive.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._excluded = {self._key(t) for t in exclude}
        self._storages: dict[tuple, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @staticmethod
    def _key(t: Tensor) -> tuple:
        return (t.device.type, t.device.index, t.untyped_storage().data_ptr())

    def _pack(self, t: Tensor) -> Tensor:
        key = self._key(t)
        if key not in self._excluded:
            self._storages[key] = t.untyped_storage().nbytes()
        # Same storage, no grad_fn: returning `t` itself would make every saved output (softmax, ...) a
        # reference cycle through its own grad_fn, leaking the graph when it is dropped without backward.
        return t.detach()

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> SavedTensorsMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def vit_block_saved_bytes(
    batch: int,
    tokens: int,
    hidden: int,
    heads: int,
    intermediate: int,
    cfg: CRSConfig | None = None,
    targets: Iterable[str] = (),
    autocast: bool = False,
    checkpointing: bool = False,
) -> int:
    """Analytic bytes one HF ViT encoder block saves for backward (eager attention, no dropout).

    Exact when `cfg` is None; otherwise with `targets` injected as `inject` does it (at ratio 1 only the
    "mlp" target changes what is saved). `autocast`
    means bf16/fp16 autocast (2-byte compute, fp32 LayerNorm and softmax, cached 2-byte weight casts).
    `checkpointing`: Hugging Face gradient checkpointing is on; modelled only for "lean_block", which then
    keeps its input alone. Parameters are not counted. This is the ideal that `SavedTensorsMeter`
    measurements are held against.
    """
    # at ratio 1 nothing is sampled (the lean block is the plain block), but the lean MLP still recomputes
    targets = set() if cfg is None else set(targets) & ({"mlp"} if cfg.exact else set(targets))
    n, d, f, dh = batch * tokens, hidden, intermediate, hidden // heads
    # the residual stream as the lean ops keep it: fp32, or crs.keep_dtype's bytes
    stream = 4 if cfg is None or cfg.kept_dtype is None else min(4, cfg.kept_dtype.itemsize)
    if "lean_block" in targets:  # the residual stream: the input, and x1 (keep_mid, no checkpointing);
        # and the MLP activation's row norms (fp32, one per row)
        return n * d * stream * (1 if checkpointing or not cfg.keep_mid else 2) + n * 4
    if checkpointing and targets:
        raise ValueError("vit_block_saved_bytes models checkpointing only for the 'lean_block' target")
    if checkpointing:  # a checkpointed plain block keeps its input alone (fp32 residual stream)
        return n * d * 4
    c = 2 if autocast else 4  # bytes per element of what linears and matmuls save
    slices = batch * heads

    def rows(k_of: int, width: int, count: int = 1) -> int:
        """`count` groups of k sampled rows of `width` elements plus int32 indices."""
        k = cfg.num_samples(k_of)
        return count * k * (width * c + 4) if k < k_of else count * k_of * width * c

    def weight_cast(d_out: int, d_in: int, name: str) -> int:
        return d_out * d_in * c if autocast and name not in targets else 0

    layer_norm = n * d * 4 + 2 * n * 4  # input + mean + rstd
    qkv = [t for t in QKV_TARGETS if t in targets]
    full_qkv = (3 - len(qkv)) * n * d * c if autocast else (n * d * 4 if len(qkv) < 3 else 0)
    qkv_bytes = full_qkv + (rows(n, d) if qkv else 0)
    qkv_bytes += sum(weight_cast(d, d, t) for t in QKV_TARGETS)
    probs = slices * tokens * tokens * 4  # softmax output (fp32), kept by softmax itself
    # scores: k of T rows of Q and k of T columns of Kᵀ per (batch, head), or all of Q and K
    scores = rows(tokens, dh, slices) * 2 if "scores" in targets else 2 * n * d * c
    if "context" in targets:
        context = rows(dh, tokens, slices)  # k of dh columns of V per slice; P is reused from softmax
    else:
        context = n * d * c + (slices * tokens * tokens * c if autocast else 0)  # V, and P's cast copy
    attn_out = (rows(n, d) if "attn_output" in targets else n * d * c) + weight_cast(d, d, "attn_output")
    if "mlp" in targets:  # only the second LayerNorm's input (the stream) and the activation's row norms
        mlp = n * d * stream + n * 4
    else:
        mlp = layer_norm
        mlp += (rows(n, d) if "fc1" in targets else n * d * c) + weight_cast(f, d, "fc1") + n * f * c
        mlp += (rows(n, f) if "fc2" in targets else n * f * c) + weight_cast(d, f, "fc2")
    return layer_norm + qkv_bytes + scores + probs + context + attn_out + mlp
