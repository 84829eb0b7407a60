"""`ModelInputs`: what a network expects of its input images, which the data module delivers.

Each model family reads it from its config node without loading weights (`ModelFamily.inputs`); the data
module's null `data.image_size`, `data.mean` and `data.std` take its values (`build_datamodule`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitcrs.errors import ConfigError


@dataclass(frozen=True)
class ModelInputs:
    """What the network expects of its input: its square side in pixels (the checkpoint's), per-channel
    normalisation, and the patch side (another input side must be a multiple of it)."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    patch_size: int = 16

    def check_image_size(self, size: Any) -> None:
        """ConfigError unless `size` (data.image_size) is a positive multiple of the patch side.

        Another size than the checkpoint's is fine-tuned with interpolated position embeddings (each family's
        `logits` / `build`); the image must still cut into whole patches.
        """
        patch = self.patch_size
        whole = isinstance(size, int) and not isinstance(size, bool)
        if whole and size >= 1 and not size % patch:
            return
        below = max(patch, size // patch * patch) if whole else 0
        example = f"data.image_size={below} or {below + patch}" if below else f"data.image_size={patch * 14}"
        raise ConfigError(
            f"data.image_size={size!r} is invalid: it must be a positive multiple of the model's patch size "
            f"{patch} (the model cuts images into {patch}x{patch} patches; its checkpoint size is "
            f"{self.image_size}). Fix: e.g. {example}, or data.image_size=null for the model's own size."
        )
