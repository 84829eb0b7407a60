"""Write small CIFAR-10 / CIFAR-100 archives in the official pickle layout, for tests (no download needed).

The files have exactly the structure torchvision (and vitcrs.data) read:

- ``<root>/cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` (dicts with
  ``batch_label``, ``labels``, ``data`` uint8 [N, 3072], ``filenames``) and ``batches.meta``
  (``label_names``, ``num_cases_per_batch``, ``num_vis``);
- ``<root>/cifar-100-python/``: ``train``, ``test`` (``filenames``, ``batch_label``, ``fine_labels``,
  ``coarse_labels``, ``data``) and ``meta`` (``fine_label_names``, ``coarse_label_names``).

CIFAR-100 coarse labels follow the official fine-to-coarse mapping. Each image is its class's colour plus
noise, and carries its position in its split in the first three red pixels (``image_index`` reads it back), so
a test can tell which archive image a loaded tensor came from. Being generated, the files fail torchvision's
md5 check: load them with ``verify_checksum=False``.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np

from vitcrs.data.cifar import (
    CIFAR10_CLASSES,
    CIFAR100_COARSE_CLASSES,
    CIFAR100_FINE_CLASSES,
    CIFAR100_FINE_TO_COARSE,
)

__all__ = ["image_index", "read_pickle", "tar_archive", "write_cifar10", "write_cifar100"]


def _images(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, 3072] in CIFAR's row layout (1024 R, 1024 G, 1024 B); index in the first 3 red pixels."""
    n = len(labels)
    colours = np.random.default_rng(12345).integers(30, 226, size=(num_classes, 3, 1))
    x = colours[labels] + rng.normal(0, 12, size=(n, 3, 1024))
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    idx = np.arange(n)
    x[:, 0, 0], x[:, 0, 1], x[:, 0, 2] = (idx >> 16) & 255, (idx >> 8) & 255, idx & 255
    return x.reshape(n, 3072)


def image_index(images) -> np.ndarray:
    """The split position written into images [N, 3, 32, 32] (uint8, numpy or torch, not augmented)."""
    x = np.asarray(images).astype(np.int64)
    return (x[:, 0, 0, 0] << 16) | (x[:, 0, 0, 1] << 8) | x[:, 0, 0, 2]


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def read_pickle(path: str | Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def write_cifar10(root: str | Path, n_train_per_batch: int = 40, n_test: int = 50, seed: int = 0) -> Path:
    """Write ``<root>/cifar-10-batches-py/`` (5 batches of ``n_train_per_batch``); returns that folder."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    n_train = 5 * n_train_per_batch
    train_labels = rng.integers(0, 10, n_train)
    train = _images(train_labels, 10, rng)
    for b in range(5):
        sl = slice(b * n_train_per_batch, (b + 1) * n_train_per_batch)
        _dump(
            folder / f"data_batch_{b + 1}",
            {
                "batch_label": f"training batch {b + 1} of 5",
                "labels": train_labels[sl].tolist(),
                "data": train[sl],
                "filenames": [f"img_{i:05d}.png" for i in range(sl.start, sl.stop)],
            },
        )
    test_labels = rng.integers(0, 10, n_test)
    _dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test_labels.tolist(),
            "data": _images(test_labels, 10, rng),
            "filenames": [f"test_{i:05d}.png" for i in range(n_test)],
        },
    )
    _dump(
        folder / "batches.meta",
        {
            "label_names": list(CIFAR10_CLASSES),
            "num_cases_per_batch": n_train_per_batch,
            "num_vis": 3072,
        },
    )
    return folder


def write_cifar100(root: str | Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    """Write ``<root>/cifar-100-python/`` with consistent fine and coarse labels; returns that folder."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    to_coarse = np.asarray(CIFAR100_FINE_TO_COARSE)
    for split, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n)
        _dump(
            folder / split,
            {
                "filenames": [f"{split}_{i:05d}.png" for i in range(n)],
                "batch_label": f"{split}ing batch 1 of 1",
                "fine_labels": fine.tolist(),
                "coarse_labels": to_coarse[fine].tolist(),
                "data": _images(fine, 100, rng),
            },
        )
    _dump(
        folder / "meta",
        {
            "fine_label_names": list(CIFAR100_FINE_CLASSES),
            "coarse_label_names": list(CIFAR100_COARSE_CLASSES),
        },
    )
    return folder


def tar_archive(folder: str | Path, tarball: str | Path) -> Path:
    """Pack an extracted folder as the official ``*-python.tar.gz`` (folder at the archive's top level)."""
    folder, tarball = Path(folder), Path(tarball)
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return tarball
