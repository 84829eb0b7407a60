"""VisionDataModule: CIFAR-10/100 (fine or coarse labels), image folders or a synthetic task, uint8 batches.

Life cycle (what the app does)::

    dm = hydra.utils.instantiate(cfg.data, image_size=..., mean=..., std=...)  # never raises, reads little
    dm.check()                       # every setting + the data's presence/integrity, ConfigError on a problem
    model = ...(num_labels=dm.num_classes)   # num_classes / class_names known without decoding images
    trainer.fit(model, datamodule=dm)        # prepare_data (download) -> setup -> loaders
    metrics["data"] = dm.describe()

Loaders yield ``(uint8 [B, 3, h, w], int64 [B])`` at native resolution (train batches randomly cropped and
flipped); :meth:`VisionDataModule.on_after_batch_transfer` turns the images into normalised float
``[B, 3, image_size, image_size]`` on the device. Lightning runs that hook only when the datamodule is passed
to the Trainer (``datamodule=dm``); code that feeds loaders by hand calls
``dm.on_after_batch_transfer(batch, 0)`` itself.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from vitcrs.data import cifar, imagefolder, synthetic
from vitcrs.data.transforms import BatchCollate, ImageTensorDataset, to_model_input
from vitcrs.errors import ConfigError

log = logging.getLogger(__name__)

SOURCES = ("cifar10", "cifar100", "imagefolder", "synthetic")
LABEL_TYPES = ("fine", "coarse")
DEFAULT_SYNTHETIC_CLASSES = 10


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
        source: ``cifar10`` | ``cifar100`` | ``imagefolder`` | ``synthetic``.
        name: display name written to metrics and tables (``cifar10``, ``cifar100_coarse``, ...); None with
            source=imagefolder: the name of the ``root`` folder.
        label_type: ``fine`` | ``coarse`` (coarse: CIFAR-100's 20 superclasses, from the archive's
            ``coarse_labels``).
        root: folder holding ``cifar-10-batches-py/`` / ``cifar-100-python/`` (or their ``.tar.gz``), or for
            imagefolder the tree with ``train/<class>/`` and ``test/<class>/``.
        batch_size: images per batch (all loaders).
        num_workers: DataLoader worker processes (0: load in the main process).
        val_fraction: share of the train split held out for validation, in [0, 1), seeded by ``split_seed``.
        split_seed: seed of the train/validation split (and of which images ``limit_train`` keeps).
        download: fetch a missing CIFAR archive into ``root`` with torchvision.
        verify_checksum: compare CIFAR files with torchvision's md5 table; ``False`` loads locally built
            archives.
        augment: random crop (4 px reflect padding) + horizontal flip of train images at native resolution.
        image_size: model input size; images are resized to it on the device.
        mean, std: per-channel normalisation of [0, 1] pixels, from the checkpoint's preprocessor config.
        load_size: imagefolder only: images are decoded and resized once to this square size, kept as uint8.
        num_classes, num_train, num_test, native_size, synthetic_seed: synthetic only
            (``num_classes`` None = 10).
        limit_train: keep only the first N images of the (shuffled, seeded) train split; None = all.
    """

    def __init__(
        self,
        source: str,
        name: str | None,
        label_type: str = "fine",
        root: str = "data",
        batch_size: int = 64,
        num_workers: int = 4,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        download: bool = True,
        verify_checksum: bool = True,
        augment: bool = True,
        image_size: int = 224,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        load_size: int = 32,
        num_classes: int | None = None,
        num_train: int = 2048,
        num_test: int = 512,
        native_size: int = 32,
        synthetic_seed: int = 0,
        limit_train: int | None = None,
    ) -> None:
        super().__init__()
        # Nothing here raises: Hydra would wrap the error; check() reports bad settings as ConfigError.
        self.source = source
        if name is None and source == "imagefolder" and isinstance(root, str | os.PathLike):
            name = Path(root).resolve().name  # a folder tree is recorded under its own name
        self.name = name
        self.label_type = label_type
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.download = download
        self.verify_checksum = verify_checksum
        self.augment = augment
        self.image_size = image_size
        self.mean = _float_list(mean)
        self.std = _float_list(std)
        self.load_size = load_size
        self.synthetic_num_classes = num_classes
        self.num_train = num_train
        self.num_test = num_test
        self.native_size = native_size
        self.synthetic_seed = synthetic_seed
        self.limit_train = limit_train

        self.train_dataset: ImageTensorDataset | None = None
        self.val_dataset: ImageTensorDataset | None = None
        self.test_dataset: ImageTensorDataset | None = None
        self.train_indices: torch.Tensor | None = None  # positions in the source's train split
        self.val_indices: torch.Tensor | None = None
        self._class_names: list[str] | None = None
        self._verified = False  # md5 already compared (check() or setup())
        # pickles read by check() (unverified archives), reused by setup()
        self._cifar_arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._norm_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ settings

    @property
    def root_path(self) -> Path:
        return cifar.resolve_root(self.root)

    def _validate_settings(self) -> None:
        def bad(key: str, value: Any, allowed: str, fix: str = "") -> ConfigError:
            return ConfigError(
                f"data.{key}={value!r} is invalid: allowed {allowed}. Fix: {fix or f'set data.{key}'}."
            )

        def is_int(v: Any) -> bool:
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        def need_int(key: str, v: Any, lo: int) -> None:
            if not is_int(v) or v < lo:
                raise bad(key, v, f"an integer >= {lo}")

        def need_bool(key: str, v: Any) -> None:
            if not isinstance(v, bool):
                raise bad(key, v, "true or false")

        if self.source not in SOURCES:
            raise bad(
                "source",
                self.source,
                " | ".join(SOURCES),
                "choose a dataset config (dataset=cifar10|cifar100|cifar100_coarse|imagefolder|"
                "synthetic) or set data.source to one of those sources",
            )
        if self.label_type not in LABEL_TYPES:
            raise bad(
                "label_type",
                self.label_type,
                " | ".join(LABEL_TYPES),
                "set data.label_type=fine (or coarse for CIFAR-100's 20 superclasses)",
            )
        if self.label_type == "coarse" and self.source != "cifar100":
            raise bad(
                "label_type",
                self.label_type,
                f"'coarse' only with data.source=cifar100 (got data.source={self.source!r})",
                "set data.label_type=fine, or use dataset=cifar100_coarse",
            )
        if not isinstance(self.name, str) or not self.name:
            raise bad("name", self.name, "a non-empty string", "set data.name, e.g. data.name=cifar10")
        if not isinstance(self.root, str | os.PathLike) or not str(self.root):
            raise bad("root", self.root, "a folder path", "set data.root=/path/to/data")
        need_int("batch_size", self.batch_size, 1)
        need_int("num_workers", self.num_workers, 0)
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, int | float) or not (0 <= vf < 1) or math.isnan(vf):
            raise bad(
                "val_fraction",
                vf,
                "a number in [0, 1) (0: no validation split)",
                "set e.g. data.val_fraction=0.1",
            )
        need_int("split_seed", self.split_seed, 0)
        need_bool("download", self.download)
        need_bool("verify_checksum", self.verify_checksum)
        need_bool("augment", self.augment)
        need_int("image_size", self.image_size, 1)
        for key in ("mean", "std"):
            v = getattr(self, key)
            if not isinstance(v, list) or len(v) != 3 or not all(_finite(x) for x in v):
                raise bad(
                    key,
                    v,
                    "a list of 3 finite numbers (one per RGB channel)",
                    f"set e.g. data.{key}=[0.5,0.5,0.5]",
                )
        if any(s <= 0 for s in self.std):
            raise bad("std", self.std, "3 numbers > 0", "set e.g. data.std=[0.5,0.5,0.5]")
        if self.limit_train is not None:
            need_int("limit_train", self.limit_train, 1)
        if self.source == "imagefolder":
            need_int("load_size", self.load_size, 8)
        if self.source == "synthetic":
            if self.synthetic_num_classes is not None:
                need_int("num_classes", self.synthetic_num_classes, 2)
            need_int("num_train", self.num_train, 1)
            need_int("num_test", self.num_test, 1)
            need_int("native_size", self.native_size, 8)
            need_int("synthetic_seed", self.synthetic_seed, 0)
        elif self.synthetic_num_classes is not None:
            raise bad(
                "num_classes",
                self.synthetic_num_classes,
                f"null unless data.source=synthetic (data.source={self.source!r} fixes the classes)",
                "remove data.num_classes (the model head follows the dataset)",
            )

    # ------------------------------------------------------------------ classes (no image decoding)

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            self._validate_settings()
            if self.source in cifar.SPECS:
                self._class_names = cifar.class_names(self.source, self.label_type)
            elif self.source == "imagefolder":
                self._class_names = imagefolder.class_names(self.root_path)
            else:
                n = self.synthetic_num_classes or DEFAULT_SYNTHETIC_CLASSES
                self._class_names = synthetic.class_names(n)
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ------------------------------------------------------------------ check / prepare / setup

    def check(self) -> VisionDataModule:
        """Validate every setting and that the data is there (or downloadable), without decoding images.

        Raises ConfigError naming the setting, the bad value, what is allowed and the fix. Returns self.
        """
        self._validate_settings()
        root = self.root_path
        if self.source in cifar.SPECS:
            spec = cifar.SPECS[self.source]
            where = cifar.locate(spec, root)
            if where == "missing":
                if not self.download:
                    raise cifar.missing_error(spec, root, "data.download=false", download=False)
                reason = cifar.can_reach(spec.url)
                if reason is not None:
                    raise cifar.missing_error(
                        spec, root, f"and data.download=true cannot fetch it: {reason}", download=True
                    )
            elif self.verify_checksum:
                if not self._verified:  # train() checks again after prepare_data: hash the files once
                    cifar.verify_checksums(spec, root, where)
                    self._verified = True
            elif where == "folder":  # unverified archive: read the pickles once (no decoding) to catch damage
                self._read_cifar(spec, root)
        elif self.source == "imagefolder":
            imagefolder.check(root)
        _ = self.class_names
        return self

    def prepare_data(self) -> None:
        """Download (torchvision) or extract a missing CIFAR archive; a no-op for the other sources."""
        if self.source not in cifar.SPECS:
            return
        self._validate_settings()
        spec, root = cifar.SPECS[self.source], self.root_path
        where = cifar.locate(spec, root)
        if where == "missing":
            if not self.download:
                raise cifar.missing_error(spec, root, "data.download=false", download=False)
            cifar.download(spec, root, self.verify_checksum)
            self._verified = self.verify_checksum
        elif where == "tarball":
            if self.verify_checksum and not self._verified:  # check() may have hashed it already
                cifar.verify_checksums(spec, root, "tarball")
            cifar.extract(spec, root)

    def _read_cifar(self, spec: cifar.CifarSpec, root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if not self._cifar_arrays:
            self._cifar_arrays = {
                split: cifar.load_split(spec, root, split, self.label_type) for split in ("train", "test")
            }
        return self._cifar_arrays

    def _load_source(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        root = self.root_path
        if self.source in cifar.SPECS:
            spec = cifar.SPECS[self.source]
            if cifar.locate(spec, root) != "folder":
                self.prepare_data()
            if self.verify_checksum and not self._verified:
                cifar.verify_checksums(spec, root, "folder")
                self._verified = True
            arrays = self._read_cifar(spec, root)
            self._cifar_arrays = {}
            (trx, try_), (tex, tey) = arrays["train"], arrays["test"]
            return torch.from_numpy(trx), torch.from_numpy(try_), torch.from_numpy(tex), torch.from_numpy(tey)
        if self.source == "imagefolder":
            data = imagefolder.load(root, self.load_size, threads=os.cpu_count())
            return (*data["train"], *data["test"])
        return synthetic.generate(
            self.num_classes, self.num_train, self.num_test, self.native_size, self.synthetic_seed
        )

    def setup(self, stage: str | None = None) -> None:
        """Load all splits once (any stage): a seeded train/val split of the train set, the test set as is."""
        if self.train_dataset is not None:
            return
        self._validate_settings()
        train_x, train_y, test_x, test_y = self._load_source()
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

    def _loader(self, dataset: ImageTensorDataset | None, train: bool) -> DataLoader:
        assert dataset is not None, "setup() must run first"
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=False,
            num_workers=self.num_workers,
            collate_fn=BatchCollate(augment=train and self.augment),
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_dataset, train=False)

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
        """What the app writes into metrics.json (loads the data if not done yet, for the split sizes)."""
        if self.train_dataset is None:
            self.setup()
        train, val, test = self.train_dataset, self.val_dataset, self.test_dataset
        assert train is not None and val is not None and test is not None
        return {
            "name": self.name,
            "source": self.source,
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
