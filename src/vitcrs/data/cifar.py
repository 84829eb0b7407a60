"""CIFAR-10 / CIFAR-100 in torchvision's on-disk layout, read straight from the official pickles.

torchvision's ``CIFAR100`` exposes only the fine labels, so the pickles are read here: that gives the
``coarse_labels`` (20 superclasses) too, lets a locally built archive (which fails torchvision's md5 test) be
loaded on an explicit opt-out, and turns every failure into a :class:`~vitcrs.errors.ConfigError` that says
where the files must be. :class:`CifarSource` is the source of ``dataset=cifar10|cifar100|cifar100_coarse``.
"""

from __future__ import annotations

import _codecs
import hashlib
import os
import pickle
import socket
import tarfile
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from vitcrs.data.source import DataSource, Splits
from vitcrs.errors import ConfigError, bad_setting, check_bool

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# fmt: off
CIFAR100_FINE_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl",
    "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair",
    "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin",
    "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp",
    "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck",
    "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television",
    "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm",
]

CIFAR100_COARSE_CLASSES = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
]

# The official superclass of each fine class (index = fine label, value = coarse label).
CIFAR100_FINE_TO_COARSE = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
]
# fmt: on


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant lives on disk and what its official files hash to (torchvision's table)."""

    source: str
    title: str
    folder: str
    tarball: str
    tarball_md5: str
    url: str
    train_files: tuple[tuple[str, str], ...]
    test_files: tuple[tuple[str, str], ...]
    meta_file: tuple[str, str]
    label_keys: dict[str, str]  # label_type -> key in the pickles

    @property
    def all_files(self) -> tuple[tuple[str, str], ...]:
        return (*self.train_files, *self.test_files, self.meta_file)

    def file_list(self) -> str:
        return ", ".join(name for name, _ in self.all_files)


CIFAR10 = CifarSpec(
    source="cifar10",
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    tarball="cifar-10-python.tar.gz",
    tarball_md5="c58f30108f718f92721af3b95e74349a",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    train_files=(
        ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
        ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
        ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
        ("data_batch_4", "634d18415352ddfa80567beed471001a"),
        ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
    ),
    test_files=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
    meta_file=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
    label_keys={"fine": "labels"},
)

CIFAR100 = CifarSpec(
    source="cifar100",
    title="CIFAR-100",
    folder="cifar-100-python",
    tarball="cifar-100-python.tar.gz",
    tarball_md5="eb9058c3a382ffc7106e4002c42a8d85",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    train_files=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
    test_files=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
    meta_file=("meta", "7973b15100ade9c7d40fb424638fde48"),
    label_keys={"fine": "fine_labels", "coarse": "coarse_labels"},
)

SPECS = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def class_names(source: str, label_type: str) -> list[str]:
    if source == "cifar10":
        return list(CIFAR10_CLASSES)
    return list(CIFAR100_COARSE_CLASSES if label_type == "coarse" else CIFAR100_FINE_CLASSES)


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _where_to_put(spec: CifarSpec, root: Path) -> str:
    return (
        f"place the official {spec.tarball} or the extracted {spec.folder}/ "
        f"({spec.file_list()}) under {root}/, i.e. {root / spec.folder}/"
    )


def locate(spec: CifarSpec, root: Path) -> str:
    """'folder' when the extracted files are all there, 'tarball' when only the archive is, else 'missing'."""
    folder = root / spec.folder
    if all((folder / name).is_file() for name, _ in spec.all_files):
        return "folder"
    if (root / spec.tarball).is_file():
        return "tarball"
    return "missing"


def verify_checksums(spec: CifarSpec, root: Path, where: str) -> None:
    """Compare the files against torchvision's md5 table; a mismatch names ``data.source.verify_checksum``."""
    items = (
        [(root / spec.folder / name, md5) for name, md5 in spec.all_files]
        if where == "folder"
        else [(root / spec.tarball, spec.tarball_md5)]
    )
    for path, expected in items:
        got = md5sum(path)
        if got != expected:
            raise ConfigError(
                f"data.source.verify_checksum=true: {path} is not the official {spec.title} file "
                f"(md5 {got}, torchvision expects {expected}). If you built this archive locally "
                f"(e.g. from the CIFAR JPEGs, or a generated test archive), set "
                f"data.source.verify_checksum=false to load it anyway; otherwise the file is damaged: delete "
                f"{path} and run again with data.source.download=true, or {_where_to_put(spec, root)}."
            )


def missing_error(spec: CifarSpec, root: Path, reason: str, download: bool) -> ConfigError:
    fix = _where_to_put(spec, root)
    if not download:
        fix += ", or set data.source.download=true to fetch it"
    return ConfigError(
        f"data.root={str(root)!r}: {spec.title} not found ({reason}). Expected {root / spec.folder}/ holding "
        f"{spec.file_list()}. Fix: {fix}; or point data.root at the folder that holds {spec.folder}/."
    )


def can_reach(url: str, timeout: float = 5.0) -> str | None:
    """None when a TCP connection to the URL's host opens, else the reason (a cheap offline probe)."""
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout):
            return None
    except OSError as e:
        return f"{parts.hostname} unreachable: {e}"


def download(spec: CifarSpec, root: Path, verify_checksum: bool) -> None:
    """torchvision's download + extract; on failure (offline) a ConfigError saying what to put where."""
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(
            spec.url, str(root), filename=spec.tarball, md5=spec.tarball_md5 if verify_checksum else None
        )
    except Exception as e:  # URLError, HTTPError, OSError, RuntimeError (md5) ...
        raise ConfigError(
            f"data.source.download=true: downloading {spec.title} from {spec.url} into {root} failed "
            f"({type(e).__name__}: {e}). Fix: {_where_to_put(spec, root)} (then data.source.download=false "
            "is fine)."
        ) from e


def _unreadable(spec: CifarSpec, path: Path, err: BaseException) -> ConfigError:
    return ConfigError(
        f"data.root={str(path.parent)!r}: {path} cannot be extracted ({type(err).__name__}: {err}). "
        f"Fix: delete it and {_where_to_put(spec, path.parent)}."
    )


def extract(spec: CifarSpec, root: Path) -> None:
    path = root / spec.tarball
    try:
        with tarfile.open(path, "r:gz") as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse unsafe members
                tar.extractall(root, filter="data")
            else:  # pragma: no cover
                tar.extractall(root)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise _unreadable(spec, path, e) from e


def _pickle_globals() -> dict[tuple[str, str], Any]:
    """What a CIFAR batch's pickle may name beyond plain data: numpy arrays (ndarray, dtype, numpy's array and
    scalar reconstructors under numpy 1's and numpy 2's module names) and `_codecs.encode` (how protocol 2
    writes bytes). Each only builds a value; none runs code given by the file."""
    reconstruct = np.ndarray((0,), np.uint8).__reduce__()[0]
    scalar = np.int64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    return allowed


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle named a Python object that `CifarUnpickler` does not admit (`name`: module.qualname)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name} is not allowed in a CIFAR batch")
        self.name = name


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that admits only what CIFAR batches hold: dicts, lists, strings, bytes, numbers and numpy
    arrays (`_pickle_globals`). Any other class or function the pickle names raises ForbiddenGlobal before it
    is called, so a file cannot run code however it was built (`data.source.verify_checksum=false`)."""

    _allowed = _pickle_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise ForbiddenGlobal(f"{module}.{name}")
        return found


def _load_pickle(f: IO[bytes], path: Path, spec: CifarSpec, root: Path, damaged: Path) -> dict:
    """The dict pickled in `f` (read from `path`) by `CifarUnpickler`; a ConfigError names a file that holds
    anything else than plain data and numpy arrays, and says to delete `damaged` when it is unreadable."""
    try:
        entry = CifarUnpickler(f, encoding="latin1").load()
    except ForbiddenGlobal as e:
        raise ConfigError(
            f"data.root: {path} was not loaded: its pickle holds {e.name}, which no {spec.title} batch holds "
            "(only dicts, lists, strings, numbers and numpy arrays), and unpickling it could run code from "
            f"the file. Fix: replace the archive with the official one ({_where_to_put(spec, root)}), or "
            "rebuild it from plain data."
        ) from None
    except Exception as e:  # UnpicklingError, EOFError (truncated), ValueError, ...
        raise ConfigError(
            f"data.root: {path} is not a readable {spec.title} pickle ({type(e).__name__}: {e}); "
            f"the archive is corrupt or truncated. Fix: delete {damaged} and "
            f"{_where_to_put(spec, root)}, or run again with data.source.download=true."
        ) from e
    if not isinstance(entry, dict):
        raise ConfigError(
            f"data.root: {path} holds a {type(entry).__name__}, not the {spec.title} dict of data/labels. "
            f"Fix: {_where_to_put(spec, root)}."
        )
    return entry


def _tarball_pickles(spec: CifarSpec, root: Path) -> Iterator[tuple[str, dict]]:
    """(file name, unpickled dict) of each data file in the archive, read in one pass without extracting."""
    path = root / spec.tarball
    wanted = {f"{spec.folder}/{name}": name for name, _ in (*spec.train_files, *spec.test_files)}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                name = wanted.pop(member.name, None)
                f = tar.extractfile(member) if name is not None else None
                if f is not None:
                    yield name, _load_pickle(f, path / member.name, spec, root, path)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise _unreadable(spec, path, e) from e
    if wanted:
        raise _unreadable(spec, path, FileNotFoundError(f"no {', '.join(sorted(wanted))} in the archive"))


def read_pickles(spec: CifarSpec, root: Path, where: str) -> dict[str, dict]:
    """Each data file's dict, from the extracted folder (where='folder') or straight from the archive."""
    if where == "tarball":
        return dict(_tarball_pickles(spec, root))
    entries = {}
    for name, _ in (*spec.train_files, *spec.test_files):
        path = root / spec.folder / name
        with open(path, "rb") as f:
            entries[name] = _load_pickle(f, path, spec, root, path.parent)
    return entries


def split_arrays(
    spec: CifarSpec, entries: dict[str, dict], root: Path, split: str, label_type: str
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 3, 32, 32] and labels int64 [N]; the images are a view of the pickled array when
    the split is one file (CIFAR-100, CIFAR-10's test), else the batches concatenated."""
    key = spec.label_keys[label_type]
    images, labels = [], []
    for name, _ in spec.train_files if split == "train" else spec.test_files:
        path = root / spec.folder / name
        entry = entries[name]
        data, lab = entry.get("data"), entry.get(key)
        ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
        if not ok or data.shape[1] != 3072:
            got = f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
            raise ConfigError(
                f"data.root: {path} has no uint8 'data' array of shape [N, 3072] (got {got}); "
                f"the archive is corrupt. Fix: {_where_to_put(spec, root)}."
            )
        if lab is None or len(lab) != len(data):
            raise ConfigError(
                f"data.root: {path} has {'no' if lab is None else len(lab)} {key!r} labels for "
                f"{len(data)} images; "
                f"the archive is corrupt or not {spec.title}. Fix: {_where_to_put(spec, root)}."
            )
        images.append(data)
        labels.append(np.asarray(lab, dtype=np.int64))
    x = images[0] if len(images) == 1 else np.concatenate(images)
    y = np.concatenate(labels)
    n_classes = len(class_names(spec.source, label_type))
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ConfigError(
            f"data.root: {root / spec.folder} has {key!r} outside 0..{n_classes - 1} "
            f"(min {y.min()}, max {y.max()}); it is not {spec.title}. Fix: {_where_to_put(spec, root)}."
        )
    return x.reshape(-1, 3, 32, 32), y


class CifarSource(DataSource):
    """CIFAR-10 or CIFAR-100 (fine or coarse labels) from the official pickles under the data root.

    Args:
        variant: ``cifar10`` | ``cifar100``.
        label_type: ``fine`` | ``coarse`` (coarse: CIFAR-100's 20 superclasses, the archive's
            ``coarse_labels``).
        download: fetch a missing archive into the data root with torchvision.
        verify_checksum: compare the files with torchvision's md5 table; ``False`` loads locally built
            archives (their pickles are then read by `check` to catch damage). Either way the pickles are
            read by `CifarUnpickler`, which admits only plain data and numpy arrays: no file runs code.
    """

    def __init__(
        self, variant: str, label_type: str = "fine", download: bool = True, verify_checksum: bool = True
    ) -> None:
        self.variant = self.kind = variant
        self.label_type = label_type
        self.download = download
        self.verify_checksum = verify_checksum
        self._verified = False  # the md5 of what `check` found already compared: `prepare`/`load` trust it
        self._pickles: dict[str, dict] = {}  # read by `check` (unverified files), reused once by `load`

    def default_name(self, root: Path) -> str:
        return self.variant if self.label_type == "fine" else f"{self.variant}_{self.label_type}"

    def _spec(self) -> CifarSpec:
        if self.variant not in SPECS:
            raise bad_setting(
                "data.source.variant",
                self.variant,
                " | ".join(SPECS),
                "choose a CIFAR dataset config (dataset=cifar10|cifar100|cifar100_coarse)",
            )
        spec = SPECS[self.variant]
        if self.label_type not in spec.label_keys:
            raise bad_setting(
                "data.source.label_type",
                self.label_type,
                f"{' | '.join(spec.label_keys)} for {spec.title} ('coarse' only with CIFAR-100)",
                "set data.source.label_type=fine (dataset=cifar100_coarse: CIFAR-100's 20 superclasses)",
            )
        check_bool("data.source.download", self.download)
        check_bool("data.source.verify_checksum", self.verify_checksum)
        return spec

    def class_names(self, root: Path) -> list[str]:
        return class_names(self._spec().source, self.label_type)

    def check(self, root: Path) -> None:
        spec = self._spec()
        where = locate(spec, root)
        if where == "missing":
            if not self.download:
                raise missing_error(spec, root, "data.source.download=false", download=False)
            reason = can_reach(spec.url)
            if reason is not None:
                raise missing_error(
                    spec, root, f"and data.source.download=true cannot fetch it: {reason}", download=True
                )
        elif self.verify_checksum:
            if not self._verified:
                verify_checksums(spec, root, where)
                self._verified = True
        elif not self._pickles:  # unverified: read the pickles (no decoding, no writing) to catch damage
            self._pickles = read_pickles(spec, root, where)

    def prepare(self, root: Path) -> None:
        """Download (torchvision) or extract a missing folder."""
        spec = self._spec()
        where = locate(spec, root)
        if where == "missing":
            if not self.download:
                raise missing_error(spec, root, "data.source.download=false", download=False)
            download(spec, root, self.verify_checksum)
            self._verified = self.verify_checksum
        elif where == "tarball":
            if self.verify_checksum and not self._verified:
                verify_checksums(spec, root, "tarball")
            extract(spec, root)

    def load(self, root: Path) -> Splits:
        spec = self._spec()
        if locate(spec, root) != "folder":
            self.prepare(root)
        if self.verify_checksum and not self._verified:
            verify_checksums(spec, root, "folder")
            self._verified = True
        entries, self._pickles = self._pickles or read_pickles(spec, root, "folder"), {}
        (trx, try_), (tex, tey) = (
            split_arrays(spec, entries, root, s, self.label_type) for s in ("train", "test")
        )
        return torch.from_numpy(trx), torch.from_numpy(try_), torch.from_numpy(tex), torch.from_numpy(tey)


def resolve_root(root: str | os.PathLike) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(str(root))))
