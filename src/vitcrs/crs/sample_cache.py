"""`SampleGradCache`: each training image's output-gradient norms from its previous visit (sample_cache).

The study's estimator: a sampled op draws row i with p ∝ ‖x_i‖·‖g_i‖, where ‖g_i‖ is the same image's
output-gradient norm at that row (per token for the linears, per head and position for the attention
matmuls) recorded in the backward pass of the image's previous training visit. Entries live in host memory,
one row per training image ([N, *row shape], bf16 or a 1-byte log code), indexed by the image's position in
the training set, which the training loader yields with each batch (`vitcrs.crs.set_training_batch`).

Unbiased from the first step: an image without an entry gets a stand-in, the running per-position (and
per-head) mean of the entries written so far (1 before any), and the op floors every estimate to stay
positive (`grad_norm.floored`), so every row keeps p > 0 and its 1/(k·p) scale. With
`cache_warmup="exact"` the sampled ops run exactly (all rows kept) while the model trains its first epoch,
filling the cache.

Outside a training batch (no indices set: validation, test, a bare forward) the ops draw with p ∝ ‖x_i‖ and
write nothing. On a GPU the entries are copied to pinned host buffers without a sync in backward and stored
at the next forward (`flush`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .config import CACHE_FORMATS
from .grad_norm import GradNormEMA
from .targets import QKV_TARGETS

# uint8 code c in 1..254 stands for 2^(LOG2_MIN + (c - 1) · LOG2_STEP) (±9 % steps from 2^-56 to 2^7.25,
# clamped); 0 stands for 0 and 255 for "no entry".
LOG2_MIN, LOG2_STEP = -56.0, 0.25
_ZERO_CODE, _MISSING_CODE = 0, 255
_ITEMSIZE = {"bfloat16": 2, "uint8": 1}


def encode(norms: Tensor, fmt: str) -> Tensor:
    """Non-negative float norms -> stored entries (bf16, or the uint8 log code); NaN -> no entry."""
    if fmt == "bfloat16":
        return norms.to(torch.bfloat16)
    code = ((torch.log2(norms.float().clamp_min(1e-38)) - LOG2_MIN) / LOG2_STEP).round() + 1
    code = torch.where(norms > 0, code.clamp(1, 254), torch.zeros_like(code))
    return torch.where(norms.isnan(), torch.full_like(code, _MISSING_CODE), code).to(torch.uint8)


def decode(entries: Tensor, fmt: str) -> Tensor:
    """Stored entries -> float32 norms, NaN where there is no entry."""
    if fmt == "bfloat16":
        return entries.float()
    value = torch.exp2(LOG2_MIN + (entries.float() - 1) * LOG2_STEP)
    value = torch.where(entries == _ZERO_CODE, torch.zeros_like(value), value)
    return torch.where(entries == _MISSING_CODE, torch.full_like(value, float("nan")), value)


def _no_entries(rows: int, shape: tuple[int, ...], fmt: str) -> Tensor:
    if fmt == "bfloat16":
        return torch.full((rows, *shape), float("nan"), dtype=torch.bfloat16)
    return torch.full((rows, *shape), _MISSING_CODE, dtype=torch.uint8)


class TrainingBatch:
    """What a model's caches share: the training set's size and the batch being trained on.

    dataset_size: images in the training set (rows of every cache); 0: no cache is kept.
    indices: dataset indices of the batch's images (int64 [B], CPU), or None outside training batches.
    exact: the sampled ops keep all rows this batch (the exact warm-up).
    """

    def __init__(self) -> None:
        self.dataset_size = 0
        self.indices: Tensor | None = None
        self.exact = False


class SampleGradCache(nn.Module):
    """The per-image ‖output gradient‖ rows of one sampled op: a gradient-norm source (see `grad_norm`).

    entries: [dataset_size, *row] in host memory (`fmt`), allocated at the first write (row: [T] for a linear,
    [heads, n] for a matmul side); a new row shape (another image size) starts it afresh. A plain attribute,
    not a buffer: `.to()` leaves it in host memory. estimate: the stand-in for images without an entry, the
    running mean over written batches of the per-position entries (momentum); a non-persistent buffer (it
    moves with `.to()`), empty before the first write.
    """

    exact = False

    def __init__(self, batch: TrainingBatch, fmt: str = "bfloat16", momentum: float = 0.9) -> None:
        super().__init__()
        if fmt not in CACHE_FORMATS:
            raise ValueError(f"crs.cache_format={fmt!r} is unknown: choose one of {', '.join(CACHE_FORMATS)}")
        self.batch, self.fmt, self.momentum = batch, fmt, momentum
        self.entries: Tensor | None = None
        self.register_buffer("estimate", torch.empty(0), persistent=False)
        self._pending: list[tuple[Tensor, Tensor, torch.cuda.Event]] = []

    # -- the gradient-norm source protocol ------------------------------------------------------------------
    def visit(self) -> _Visit | None:
        indices = self.batch.indices
        if indices is None:
            return None
        self.flush()
        return _Visit(self, indices, self.batch.exact)

    # -- storage --------------------------------------------------------------------------------------------
    def read(self, indices: Tensor, shape: torch.Size, device: torch.device) -> Tensor:
        """Per-row estimates [B, *row] >= 0 for the images `indices` (their entries, or the stand-in)."""
        row = tuple(shape[1:])
        if self.entries is not None and tuple(self.entries.shape[1:]) == row:
            cached = decode(self.entries.index_select(0, indices).to(device, non_blocking=True), self.fmt)
        else:
            cached = torch.full(tuple(shape), float("nan"), device=device)
        standin = self.estimate if tuple(self.estimate.shape) == row else torch.ones(row, device=device)
        return torch.where(cached.isnan(), standin, cached)

    @torch.no_grad()
    def write(self, indices: Tensor, norms: Tensor) -> None:
        """Store `norms` [B, *row] (this backward's) as the entries of the images `indices`; a non-finite
        norm (an overflow that a GradScaler skips) leaves no entry there and stays out of the stand-in."""
        norms = norms.detach().float()
        norms = torch.where(norms.isfinite(), norms, torch.full_like(norms, float("nan")))
        mean = norms.nanmean(0)
        if self.estimate.shape != mean.shape:
            self.estimate = torch.where(mean.isnan(), torch.ones_like(mean), mean)
        else:  # positions no image of this batch had a finite norm at keep their stand-in
            update = self.estimate * self.momentum + mean * (1 - self.momentum)
            self.estimate = torch.where(mean.isnan(), self.estimate, update)
        size = self.batch.dataset_size
        if size == 0:
            return
        row = tuple(norms.shape[1:])
        if self.entries is None or tuple(self.entries.shape[1:]) != row:
            self.flush()
            self.entries = _no_entries(size, row, self.fmt)
        codes = encode(norms, self.fmt)
        if codes.device.type != "cuda":
            self.entries.index_copy_(0, indices, codes.cpu())
            return
        staged = torch.empty(codes.shape, dtype=codes.dtype, pin_memory=True)
        staged.copy_(codes, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((indices, staged, event))

    def flush(self) -> None:
        """Store the entries whose device-to-host copies are under way (waits for them)."""
        for indices, staged, event in self._pending:
            event.synchronize()
            if self.entries is not None and self.entries.shape[1:] == staged.shape[1:]:
                self.entries.index_copy_(0, indices, staged)
        self._pending.clear()

    @property
    def nbytes(self) -> int:
        """Host bytes the entries take."""
        self.flush()
        return 0 if self.entries is None else self.entries.nbytes

    def clear(self) -> None:
        """Forget every entry (the stand-in stays)."""
        self._pending.clear()
        self.entries = None

    # -- checkpoints ----------------------------------------------------------------------------------------
    def entries_state(self) -> Tensor | None:
        self.flush()
        return self.entries

    def load_entries_state(self, entries: Tensor | None) -> None:
        self.clear()
        if entries is not None and entries.shape[0] == self.batch.dataset_size:
            self.entries = entries if entries.dtype == _dtype(self.fmt) else None  # (no copy: GBs)


GradNormSource = GradNormEMA | SampleGradCache  # where a sampled op gets its ‖output gradient‖ estimates


def _dtype(fmt: str) -> torch.dtype:
    return torch.bfloat16 if fmt == "bfloat16" else torch.uint8


class _Visit:
    """One training forward of one op: reads its images' entries, writes them in its backward."""

    def __init__(self, cache: SampleGradCache, indices: Tensor, exact: bool) -> None:
        self.cache, self.indices, self.exact = cache, indices, exact

    def _fits(self, shape: torch.Size) -> bool:
        return len(shape) >= 2 and shape[0] == self.indices.shape[0]

    def weights(self, norms: Tensor) -> Tensor | None:
        """Estimates [B, *row] for row norms `norms` [B, *row] of this batch; None if it is not this batch."""
        if not self._fits(norms.shape):
            return None
        return self.cache.read(self.indices, norms.shape, norms.device)

    def update(self, norms: Tensor) -> None:
        if self._fits(norms.shape):
            self.cache.write(self.indices, norms)


def sample_cache_bytes_per_image(
    tokens: int, hidden: int, heads: int, layers: int, targets: Iterable[str], fmt: str = "bfloat16"
) -> int:
    """Analytic host bytes of one image's entries: per block one [tokens] row for q/k/v (shared) and for each
    of attn_output, fc1, fc2; [heads, tokens] for each side of `scores` (Q's rows, Kᵀ's columns); [heads,
    head_dim] for `context` (V's columns; P is reused, so its side is exact and needs none). The lean `mlp`
    samples with the exact gradient of the same step and needs none."""
    t = set(targets)
    per_block = tokens if t & set(QKV_TARGETS) else 0
    per_block += tokens * len(t & {"attn_output", "fc1", "fc2"})
    per_block += 2 * heads * tokens if "scores" in t else 0
    per_block += hidden if "context" in t else 0  # heads x head_dim
    return layers * per_block * _ITEMSIZE[fmt]
