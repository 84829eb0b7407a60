"""``root/{train,test}/<class>/<image>`` trees, decoded once to a square uint8 tensor and cached.

Classes are the sub-folders of ``root/train`` in sorted order (the same rule as torchvision's ImageFolder, and
for the CIFAR-10 JPEG tree the official label order). Images are decoded with ``torchvision.io`` (PIL as a
fallback for formats it does not read) on a thread pool, resized to ``load_size`` x ``load_size`` and kept as
uint8. The decoded tensors are cached in ``root/.vitcrs_cache_<load_size>.pt`` keyed by the file list (names,
sizes, modification times), so a second run skips decoding; an unwritable root just means no cache.
:class:`ImageFolderSource` is the data source of ``dataset=imagefolder``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vitcrs.data.source import DataSource, Splits
from vitcrs.errors import ConfigError, check_int

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLITS = ("train", "test")
CACHE_VERSION = 1

LAYOUT = "data.root/train/<class>/<image> and data.root/test/<class>/<image> (one folder per class)"


def _subdirs(path: Path) -> list[str]:
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _images(path: Path) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(
            (e for e in it if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)), key=lambda e: e.name
        )


def _hint(root: Path) -> str:
    """Suggest a sub-folder that has the expected layout (e.g. data/cifar10-jpeg when data.root=data)."""
    if not root.is_dir():
        return ""
    for name in _subdirs(root):
        if (root / name / "train").is_dir() and (root / name / "test").is_dir():
            return f" {root / name} has train/ and test/: set data.root={root / name}."
    return ""


def _split_folder(root: Path, split: str, fix: str, hint: str = "") -> Path:
    """root/split; ConfigError naming data.root, the layout and `fix` when it is not a folder."""
    folder = root / split
    if not folder.is_dir():
        raise ConfigError(
            f"data.root={str(root)!r}: no {folder}/ folder; source=imagefolder expects {LAYOUT}.{hint} "
            f"Fix: {fix}"
        )
    return folder


def _classes_without_images(classes: list[str], files: list[tuple[os.DirEntry, int]]) -> list[str]:
    present = {label for _, label in files}
    return [name for label, name in enumerate(classes) if label not in present]


def _names(names: list[str]) -> str:
    """The first five of `names`, and "..." when there are more."""
    return ", ".join(names[:5]) + ("..." if len(names) > 5 else "")


def class_names(root: Path) -> list[str]:
    """Sorted class folders of ``root/train``; ConfigError when there are fewer than 2 (no image decoding)."""
    train = _split_folder(root, "train", "point data.root at such a tree.", _hint(root))
    classes = _subdirs(train)
    if not classes:
        raise ConfigError(
            f"data.root={str(root)!r}: {train}/ has no class sub-folders; source=imagefolder expects "
            f"{LAYOUT}. "
            f"Fix: put each class's images in its own folder, e.g. {train}/cat/0001.jpg."
        )
    if len(classes) < 2:
        raise ConfigError(
            f"data.root={str(root)!r}: {train}/ has a single class folder ({classes[0]!r}); a classifier "
            f"needs at least 2 classes. Fix: put each class's images in its own folder under {train}/."
        )
    return classes


def list_split(root: Path, split: str, classes: list[str]) -> list[tuple[os.DirEntry, int]]:
    out = []
    for label, name in enumerate(classes):
        folder = root / split / name
        if folder.is_dir():
            out.extend((entry, label) for entry in _images(folder))
    return out


def check(root: Path) -> dict[str, list[tuple[os.DirEntry, int]]]:
    """Validate the tree without decoding: both splits, same class folders, images in each class of each
    split."""
    return _checked(root)[1]


def _checked(root: Path) -> tuple[list[str], dict[str, list[tuple[os.DirEntry, int]]]]:
    """`check`, returning the class names it read as well."""
    classes = class_names(root)
    test = _split_folder(root, "test", f"add the test split as {root / 'test'}/<class>/<image>.")
    test_classes = _subdirs(test)
    if set(test_classes) != set(classes):
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise ConfigError(
            f"data.root={str(root)!r}: train/ and test/ have different class folders "
            f"(only in train: {only_train}; only in test: {only_test}). Fix: give both splits the same class "
            f"folders, since labels are the sorted folder names."
        )
    files = {split: list_split(root, split, classes) for split in SPLITS}
    empty = _classes_without_images(classes, files["train"])
    if empty:
        raise ConfigError(
            f"data.root={str(root)!r}: train class folders without images ({_names(empty)}); images must "
            f"end in one of {', '.join(IMAGE_EXTENSIONS)}. Fix: add images or remove those folders from "
            "train/ and test/."
        )
    if not files["test"]:
        raise ConfigError(
            f"data.root={str(root)!r}: {test}/ has class folders but no images "
            f"(extensions {', '.join(IMAGE_EXTENSIONS)}). Fix: add the test images."
        )
    untested = _classes_without_images(classes, files["test"])
    if untested:
        raise ConfigError(
            f"data.root={str(root)!r}: test class folders without images ({_names(untested)}): the "
            f"test accuracy would cover {len(classes) - len(untested)} of the {len(classes)} classes. Fix: "
            f"add test images to them (extensions {', '.join(IMAGE_EXTENSIONS)}), or remove those folders "
            "from train/ and test/."
        )
    return classes, files


def _decode(path: str, size: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2.functional import resize

    try:
        img = decode_image(read_file(path), mode=ImageReadMode.RGB)
    except Exception:  # a format torchvision.io cannot read (bmp, tiff, ...): PIL
        try:
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                img = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        except Exception as e:
            raise ConfigError(
                f"data.root: cannot decode image {path} ({type(e).__name__}: {e}). "
                f"Fix: delete or replace the file."
            ) from e
    if img.shape[-2:] != (size, size):
        img = resize(img, [size, size], antialias=True)
    return img.contiguous()


def _decode_all(paths: list[str], size: int, threads: int) -> torch.Tensor:
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    if not paths:
        return out

    def work(lo_hi: tuple[int, int]) -> None:
        for i in range(*lo_hi):
            out[i] = _decode(paths[i], size)

    chunk = 512
    ranges = [(lo, min(lo + chunk, len(paths))) for lo in range(0, len(paths), chunk)]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(work, ranges))
    return out


def _cache_key(root: Path, files: dict[str, list[tuple[os.DirEntry, int]]], size: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION} size={size}\n".encode())
    for split in SPLITS:
        for entry, label in files[split]:
            st = entry.stat()
            rel = os.path.relpath(entry.path, root)
            h.update(f"{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_path(root: Path, size: int) -> Path:
    return root / f".vitcrs_cache_{size}.pt"


def load(root: Path, size: int, threads: int | None = None, use_cache: bool = True) -> dict:
    """{'classes', 'train': (images, labels), 'test': (images, labels)}; images uint8 [N, 3, size, size]."""
    classes, files = _checked(root)  # one listing of train/ for both
    key = _cache_key(root, files, size)
    cache = cache_path(root, size)
    if use_cache and cache.is_file():
        try:
            blob = torch.load(cache, map_location="cpu", weights_only=True)
            if blob.get("key") == key:
                log.info("imagefolder: using decoded cache %s", cache)
                return {"classes": classes, "train": tuple(blob["train"]), "test": tuple(blob["test"])}
        except Exception as e:  # stale or damaged cache: decode again
            log.warning("imagefolder: ignoring unreadable cache %s (%s)", cache, e)
    threads = threads or min(8, os.cpu_count() or 1)
    out = {"classes": classes}
    for split in SPLITS:
        entries = files[split]
        images = _decode_all([e.path for e, _ in entries], size, threads)
        labels = torch.tensor([lab for _, lab in entries], dtype=torch.int64)
        out[split] = (images, labels)
    if use_cache:
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        try:
            torch.save({"key": key, "train": out["train"], "test": out["test"]}, tmp)
            os.replace(tmp, cache)
        except OSError as e:
            log.warning("imagefolder: could not write cache %s (%s); decoding again next run", cache, e)
            tmp.unlink(missing_ok=True)
    return out


class ImageFolderSource(DataSource):
    """A ``root/{train,test}/<class>/<image>`` tree; recorded under the root folder's name by default.

    Args:
        load_size: images are decoded and resized once to this square size, kept as uint8.
    """

    kind = "imagefolder"

    def __init__(self, load_size: int = 32) -> None:
        self.load_size = load_size

    def default_name(self, root: Path) -> str:
        return root.resolve().name

    def class_names(self, root: Path) -> list[str]:
        return class_names(root)

    def check(self, root: Path) -> None:
        check_int("data.source.load_size", self.load_size, 8)
        check(root)

    def load(self, root: Path) -> Splits:
        check_int("data.source.load_size", self.load_size, 8)
        data = load(root, self.load_size, threads=os.cpu_count())
        return (*data["train"], *data["test"])
