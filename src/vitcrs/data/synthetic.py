"""A small generated image-classification task that needs no files and is learnable in an epoch or two.

Each class has a fixed smooth colour pattern (a random 4x4x3 grid upsampled to the native size, made
left-right symmetric so that the horizontal-flip augmentation does not change it); an image is its class's
pattern plus pixel noise and a random brightness shift. Everything is drawn from one seeded generator, so the
same settings give the same bytes on every machine. :class:`SyntheticSource` is the data source of
``dataset=synthetic``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from vitcrs.data.source import DataSource, Splits
from vitcrs.errors import check_int

NOISE_STD = 0.08  # per-pixel Gaussian noise, in [0, 1] intensity units
BRIGHTNESS = 0.10  # per-image uniform brightness shift in [-BRIGHTNESS, BRIGHTNESS]


def class_names(num_classes: int) -> list[str]:
    width = len(str(num_classes - 1))
    return [f"class_{i:0{width}d}" for i in range(num_classes)]


def prototypes(num_classes: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[C, 3, size, size] float patterns in [0.15, 0.85]."""
    low = torch.rand(num_classes, 3, 4, 4, generator=generator)
    low = (low + low.flip(-1)) / 2  # symmetric: a flipped image is still its class's pattern
    low = (low - low.amin(dim=(1, 2, 3), keepdim=True)) / (
        low.amax(dim=(1, 2, 3), keepdim=True) - low.amin(dim=(1, 2, 3), keepdim=True) + 1e-6
    )  # full contrast per class
    up = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return 0.15 + 0.7 * up


def balanced_labels(n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """n labels, each class count floor(n/C) or ceil(n/C), in a seeded random order."""
    labels = torch.arange(n) % num_classes
    return labels[torch.randperm(n, generator=generator)]


def sample(protos: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 [N, 3, S, S] images: pattern + noise + brightness shift, clamped."""
    n = labels.shape[0]
    x = protos[labels]
    x = x + NOISE_STD * torch.randn(x.shape, generator=generator)
    x = x + BRIGHTNESS * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
    return (x.clamp_(0, 1) * 255).round_().to(torch.uint8)


def generate(
    num_classes: int, num_train: int, num_test: int, size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_images, train_labels, test_images, test_labels), deterministic for ``seed``."""
    g = torch.Generator().manual_seed(seed)
    protos = prototypes(num_classes, size, g)
    train_y = balanced_labels(num_train, num_classes, g)
    train_x = sample(protos, train_y, g)
    test_y = balanced_labels(num_test, num_classes, g)
    test_x = sample(protos, test_y, g)
    return train_x, train_y, test_x, test_y


class SyntheticSource(DataSource):
    """The generated task (no files: the data root is not read).

    Args:
        num_classes: generated classes (balanced); num_train, num_test: images per split;
        native_size: image side in pixels; seed: seed of the generated images.
    """

    kind = "synthetic"

    def __init__(
        self,
        num_classes: int = 10,
        num_train: int = 2048,
        num_test: int = 512,
        native_size: int = 32,
        seed: int = 0,
    ) -> None:
        self.num_classes = num_classes
        self.num_train = num_train
        self.num_test = num_test
        self.native_size = native_size
        self.seed = seed

    def check(self, root: Path) -> None:
        check_int("data.source.num_classes", self.num_classes, 2)
        check_int("data.source.num_train", self.num_train, 1)
        check_int("data.source.num_test", self.num_test, 1)
        check_int("data.source.native_size", self.native_size, 8)
        check_int("data.source.seed", self.seed, 0)

    def class_names(self, root: Path) -> list[str]:
        self.check(root)
        return class_names(self.num_classes)

    def load(self, root: Path) -> Splits:
        self.check(root)
        return generate(self.num_classes, self.num_train, self.num_test, self.native_size, self.seed)
