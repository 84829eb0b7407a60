"""Cheap uint8 augmentation on the CPU, resize + normalisation on the device.

The loaders hand out whole batches of uint8 images at native resolution (CIFAR: 3x32x32, 3 KB each); the
random crop (reflect padding) and horizontal flip are one batched gather on those bytes. Conversion to float,
bilinear upsampling to the model's input size and normalisation run after the batch reached the device, so a
224 px float batch is never built or copied on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class ImageTensorDataset(Dataset):
    """uint8 images [N, C, H, W] and int64 labels [N] held in memory, fetched a whole batch at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [N={images.shape[0]}], got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # The DataLoader's fetcher calls this with a whole batch of indices: one gather instead of B items.
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]


def random_crop_flip(
    images: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-image random crop of the reflect-padded image (same size) and random horizontal flip.

    ``images``: [B, C, H, W] of any dtype (uint8 here); one batched gather, no float copy, no PIL.
    """
    b, _, h, w = images.shape
    if b == 0 or pad == 0:
        return images
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    flip = torch.rand(b, 1, generator=generator) < 0.5
    rows = _reflect(torch.arange(h) + dy - pad, h)  # [B, H]
    cols = _reflect(torch.arange(w) + dx - pad, w)  # [B, W]
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(b)[:, None, None]
    out = images[batch, :, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map padded coordinates to source ones like ``F.pad(mode='reflect')`` (edge pixel not repeated)."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


class BatchCollate:
    """collate_fn for :class:`ImageTensorDataset`: stacks (if needed) and optionally augments a uint8 batch.

    A plain class (not a closure) so that worker processes can pickle it.
    """

    def __init__(self, augment: bool, pad: int = 4) -> None:
        self.augment = augment
        self.pad = pad

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
            images, labels = batch
        else:  # a list of (image, label) samples
            images = torch.stack([img for img, _ in batch])
            labels = torch.stack([torch.as_tensor(lab, dtype=torch.int64) for _, lab in batch])
        if self.augment:
            images = random_crop_flip(images, self.pad)
        return images, labels


def to_model_input(
    images: torch.Tensor,
    image_size: int,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """uint8 [B, C, H, W] on any device -> float32 [B, C, S, S]: /255, bilinear resize, (x - mean) / std."""
    x = images.to(torch.float32).div_(255.0)
    h, w = x.shape[-2:]
    if (h, w) != (image_size, image_size) and x.shape[0] > 0:
        x = F.interpolate(
            x,
            size=(image_size, image_size),
            mode="bilinear",
            align_corners=False,
            antialias=image_size < min(h, w),  # only matters when shrinking
        )
    # Pass mean/std as tensors already on the device to avoid a tiny host-to-device copy per batch.
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)
