"""`DataSource`: what one dataset is (its classes, where its files live, how they are fetched and read).

A source holds only its own settings (the `data.source` config node); the data module passes it the data
folder (`data.root`) and owns splitting, loading and batching. A new dataset is one subclass (and its
conf/dataset/*.yaml naming it as `_target_`). Constructors never raise (Hydra would wrap the error):
`check` and `class_names` report bad settings as ConfigError naming the `data.source.*` key.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

# (train images uint8 [N, 3, H, W], train labels int64 [N], test images, test labels)
Splits = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class DataSource(ABC):
    """One image-classification dataset with a train and a test split.

    `kind` is recorded in metrics.json as the data's `source`; `label_type` is `fine` unless the dataset has
    several label sets.
    """

    kind: str
    label_type: str = "fine"

    def default_name(self, root: Path) -> str:
        """The name runs are recorded under when `data.name` is null."""
        return self.kind

    @abstractmethod
    def class_names(self, root: Path) -> list[str]:
        """The classes in label order, without decoding images; ConfigError on a bad setting."""

    @abstractmethod
    def check(self, root: Path) -> None:
        """Every setting and the data's presence and integrity (or that it can be fetched); writes nothing."""

    def prepare(self, root: Path) -> None:  # noqa: B027 (most sources have nothing to fetch)
        """Fetch or unpack what `load` reads (Lightning calls it once per node, before `load`)."""

    @abstractmethod
    def load(self, root: Path) -> Splits:
        """Both splits, decoded to uint8 at native resolution."""
