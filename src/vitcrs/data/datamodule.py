"""VisionDataModule: one data source (CIFAR-10/100, an image folder, the synthetic task) in uint8 batches.

Life cycle (what the app does)::

    dm = build_datamodule(data_node, family.inputs(model_node))  # instantiate + check(): ConfigError on a
                                             # bad setting or missing/corrupt data; nothing decoded
    model = ...(num_labels=dm.num_classes)   # num_classes / class_names known without decoding images
    trainer.fit(model, datamodule=dm)        # prepare_data (download/extract) -> setup -> loaders
    dm.describe()                            # the splits' sizes and settings (logged at setup)

Loaders yield ``(uint8 [B, 3, h, w], int64 [B])`` at native resolution (training batches randomly cropped and
flipped, a function of (seed, epoch, step, rank): `vitcrs.data.train_loader`; with ``batch_indices`` they
also carry the images' dataset indices, int64 [B]). The data module's ``state_dict`` is the training loader's
position, so a checkpoint resumes mid-epoch at the next image.
:meth:`VisionDataModule.on_after_batch_transfer` turns the images into normalised float
``[B, 3, image_size, image_size]`` on the device. Lightning runs that hook only when the datamodule is
passed to the Trainer (``datamodule=dm``); code that feeds loaders by hand calls
``dm.on_after_batch_transfer(batch, 0)`` itself.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from vitcrs.data.cifar import resolve_root
from vitcrs.data.inputs import ModelInputs
from vitcrs.data.source import DataSource
from vitcrs.data.train_loader import EpochSampler, TrainLoader
from vitcrs.data.transforms import BatchCollate, ImageTensorDataset, to_model_input
from vitcrs.errors import ConfigError, bad_setting, check_bool, check_int

log = logging.getLogger(__name__)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _float_list(value: Any) -> Any:
    """A list of floats when ``value`` is a sequence of numbers (Hydra's ListConfig included), else as is."""
    if isinstance(value, str | bytes):
        return value
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return value


class VisionDataModule(L.LightningDataModule):
    """Image-classification data for ViT fine-tuning, kept small in memory (uint8, native resolution).

    Args:
        source: the dataset (a :class:`~vitcrs.data.source.DataSource`, the ``data.source`` node).
        name: the name written to metrics and tables; None: the source's (an image folder: its folder's name).
        root: the folder the source reads and downloads into (CIFAR: holding ``cifar-10-batches-py/`` /
            ``cifar-100-python/`` or their ``.tar.gz``; imagefolder: the tree with ``train/`` and ``test/``).
        batch_size: images per batch (all loaders; per process under data parallelism).
        num_workers: DataLoader worker processes (0: load in the main process).
        val_fraction: share of the train split held out for validation, in [0, 1), seeded by ``split_seed``.
        split_seed: seed of the train/validation split (and of which images ``limit_train`` keeps).
        augment: random crop (4 px reflect padding) + horizontal flip of train images at native resolution.
        image_size: model input size; images are resized to it on the device.
        mean, std: per-channel normalisation of [0, 1] pixels, from the checkpoint's preprocessor config.
        limit_train: keep only the first N images of the (shuffled, seeded) train split; None = all.
        seed: the run's seed: the training order and augmentation are a function of (seed, epoch, step, rank).
        batch_indices: training batches also carry their images' dataset indices (``crs.prob=sample_cache``).
    """

    def __init__(
        self,
        source: DataSource,
        name: str | None = None,
        root: str = "data",
        batch_size: int = 64,
        num_workers: int = 4,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        augment: bool = True,
        image_size: int = 224,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        limit_train: int | None = None,
        seed: int = 0,
        batch_indices: bool = False,
    ) -> None:
        super().__init__()
        # Nothing here raises: Hydra would wrap the error; check() reports bad settings as ConfigError.
        self.source = source
        self._name = name
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.augment = augment
        self.image_size = image_size
        self.mean = _float_list(mean)
        self.std = _float_list(std)
        self.limit_train = limit_train
        self.seed = seed
        self.batch_indices = batch_indices

        self.train_dataset: ImageTensorDataset | None = None
        self.val_dataset: ImageTensorDataset | None = None
        self.test_dataset: ImageTensorDataset | None = None
        self.train_indices: torch.Tensor | None = None  # positions in the source's train split
        self.val_indices: torch.Tensor | None = None
        self._train_loader: TrainLoader | None = None
        self._train_state: dict[str, Any] | None = None  # a checkpoint's loader position, for the next loader
        self._norm_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ settings

    @property
    def root_path(self) -> Path:
        return resolve_root(self.root)

    @property
    def name(self) -> str:
        """`name`, else the source's name for the data root (an image folder: the folder's name)."""
        return self._name if self._name is not None else self.source.default_name(self.root_path)

    @property
    def label_type(self) -> str:
        return self.source.label_type

    def _validate_settings(self) -> None:
        if not isinstance(self.source, DataSource):
            raise bad_setting(
                "data.source",
                self.source,
                "a vitcrs.data.DataSource (the dataset group's data.source node)",
                "choose a dataset config, dataset=<a file of conf/dataset/>, e.g. dataset=cifar10",
            )
        if not isinstance(self.root, str | os.PathLike) or not str(self.root):
            raise bad_setting("data.root", self.root, "a folder path", "set data.root=/path/to/data")
        if not isinstance(self.name, str) or not self.name:
            raise bad_setting(
                "data.name", self.name, "a non-empty string", "set data.name, e.g. data.name=cifar10"
            )
        check_int("data.batch_size", self.batch_size, 1)
        check_int("data.num_workers", self.num_workers, 0)
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, int | float) or not (0 <= vf < 1) or math.isnan(vf):
            raise bad_setting(
                "data.val_fraction",
                vf,
                "a number in [0, 1) (0: no validation split)",
                "set e.g. data.val_fraction=0.1",
            )
        check_int("data.split_seed", self.split_seed, 0)
        check_bool("data.augment", self.augment)
        check_int("data.image_size", self.image_size, 1)
        for key in ("mean", "std"):
            v = getattr(self, key)
            if not isinstance(v, list) or len(v) != 3 or not all(_finite(x) for x in v):
                raise bad_setting(
                    f"data.{key}",
                    v,
                    "a list of 3 finite numbers (one per RGB channel)",
                    f"set e.g. data.{key}=[0.5,0.5,0.5]",
                )
        if any(s <= 0 for s in self.std):
            raise bad_setting("data.std", self.std, "3 numbers > 0", "set e.g. data.std=[0.5,0.5,0.5]")
        if self.limit_train is not None:
            check_int("data.limit_train", self.limit_train, 1)
        check_int("data.seed", self.seed, 0)
        check_bool("batch_indices", self.batch_indices)

    # ------------------------------------------------------------------ classes (no image decoding)

    @property
    def class_names(self) -> list[str]:
        self._validate_settings()
        return self.source.class_names(self.root_path)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ------------------------------------------------------------------ check / prepare / setup

    def check(self) -> VisionDataModule:
        """Validate every setting and that the data is there (or downloadable), without decoding images or
        writing anything: the app's pre-flight check. Raises ConfigError naming the setting, the bad value,
        what is allowed and the fix. Returns self."""
        self._validate_settings()
        self.source.check(self.root_path)
        return self

    def prepare_data(self) -> None:
        """Download or extract what the source reads (Lightning: once per node, before setup)."""
        self._validate_settings()
        self.source.prepare(self.root_path)

    def setup(self, stage: str | None = None) -> None:
        """Load all splits once (any stage): a seeded train/val split of the train set, the test set as is."""
        if self.train_dataset is not None:
            return
        self._validate_settings()
        train_x, train_y, test_x, test_y = self.source.load(self.root_path)
        n = train_x.shape[0]
        n_val = round(self.val_fraction * n)
        if n - n_val < 1:
            raise ConfigError(
                f"data.val_fraction={self.val_fraction} leaves no training images out of {n}. "
                f"Fix: lower data.val_fraction (allowed [0, 1))."
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(self.split_seed)))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        if self.limit_train is not None:
            train_idx = train_idx[: self.limit_train]  # a seeded random subset (archives may be class-sorted)
        train_idx, val_idx = train_idx.sort().values, val_idx.sort().values
        self.train_indices, self.val_indices = train_idx, val_idx
        self.train_dataset = ImageTensorDataset(train_x[train_idx], train_y[train_idx])
        self.val_dataset = ImageTensorDataset(train_x[val_idx], train_y[val_idx])
        self.test_dataset = ImageTensorDataset(test_x.contiguous(), test_y)
        log.info("data %s: %s", self.name, self.describe())

    # ------------------------------------------------------------------ loaders

    def train_dataloader(self) -> TrainLoader:
        """This process's training batches (rank and world size from the Trainer, if attached); its position
        is the data module's checkpoint state."""
        self.setup()
        assert self.train_dataset is not None
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        loader = TrainLoader(
            self.train_dataset,
            EpochSampler(self.train_dataset, int(self.batch_size), int(self.seed), rank, world),
            BatchCollate(augment=self.augment),
            indices=self.batch_indices,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        if self._train_state is not None:
            loader.load_state_dict(self._train_state)
        self._train_loader = loader
        return loader

    def _eval_loader(self, dataset: ImageTensorDataset | None, split: str) -> DataLoader:
        """A loader of `dataset` in order; under data parallelism this rank's share, every image on exactly
        one rank (none repeated to even the ranks out: the accuracy, summed over ranks, counts each image
        once)."""
        self.setup()
        assert dataset is not None
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = None
        if world > 1:
            if 0 < len(dataset) < world:
                raise ConfigError(
                    f"the {split} split has {len(dataset)} images, fewer than the {world} data-parallel "
                    "processes: each needs at least one. Fix: fewer processes (trainer.devices), or a larger "
                    f"split{' (data.val_fraction)' if split == 'validation' else ''}."
                )
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=BatchCollate(augment=False),
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_dataset, "validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_dataset, "test")

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (Lightning stores it in every checkpoint)."""
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training loader at a checkpoint's position (Lightning restores it before the loader is
        built, or, if it already was, hands it over)."""
        self._train_state = state_dict.get("train_loader")
        if self._train_loader is not None and self._train_state is not None:
            self._train_loader.load_state_dict(self._train_state)

    # ------------------------------------------------------------------ device side
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 images -> float [B, 3, image_size, image_size], (x/255 - mean) / std, on the batch device.

        Further batch elements (the dataset indices of a training batch) are passed on as they are."""
        images, labels, *rest = batch
        if images.dtype == torch.uint8:
            key = images.device
            if key not in self._norm_cache:
                self._norm_cache[key] = (
                    torch.tensor(self.mean, dtype=torch.float32, device=key),
                    torch.tensor(self.std, dtype=torch.float32, device=key),
                )
            mean, std = self._norm_cache[key]
            images = to_model_input(images, int(self.image_size), mean, std)
        return (images, labels, *rest)

    # ------------------------------------------------------------------ reporting

    def describe(self) -> dict[str, Any]:
        """The data's settings and its splits' sizes, as logged when it is set up (loads the data if not
        done yet, for the split sizes)."""
        if self.train_dataset is None:
            self.setup()
        train, val, test = self.train_dataset, self.val_dataset, self.test_dataset
        assert train is not None and val is not None and test is not None
        return {
            "name": self.name,
            "source": self.source.kind,
            "label_type": self.label_type,
            "num_classes": self.num_classes,
            "num_train": len(train),
            "num_val": len(val),
            "num_test": len(test),
            "native_size": int(train.images.shape[-1]),
            "image_size": int(self.image_size),
            "val_fraction": float(self.val_fraction),
            "split_seed": int(self.split_seed),
            "limit_train": self.limit_train,
        }


def build_datamodule(
    data: Mapping[str, Any], inputs: ModelInputs, batch_indices: bool = False
) -> VisionDataModule:
    """The checked (unprepared) data module of the `data` config node (plain: its `_target_`, `source`, ...)
    for a network with input contract `inputs` (`ModelFamily.inputs`): a null data.image_size / mean / std
    is the network's own, another image size must suit its patches. batch_indices: training batches carry
    the images' dataset indices (crs.prob=sample_cache). Raises ConfigError; nothing is decoded or written."""
    if "batch_indices" in data:
        raise ConfigError(
            "data.batch_indices is set by vitcrs itself (true with crs.prob=sample_cache, whose cache needs "
            "each training image's dataset index): drop the +data.batch_indices override."
        )
    size, mean, std = (data.get(k) for k in ("image_size", "mean", "std"))
    if size is not None:
        inputs.check_image_size(size)
    datamodule = instantiate(
        dict(data),
        _convert_="all",
        image_size=size if size is not None else inputs.image_size,
        mean=mean if mean is not None else list(inputs.mean),
        std=std if std is not None else list(inputs.std),
        batch_indices=batch_indices,
    )
    return datamodule.check()
