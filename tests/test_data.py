"""vitcrs.data: CIFAR-10/100 (fine/coarse) from official-format archives, splits, errors, image folders,
the synthetic task, batch augmentation and the on-device resize + normalisation; each source behind the one
data module."""

from __future__ import annotations

import inspect
import itertools
import os
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import RandomSampler

from cifar_archives import image_index, read_pickle, tar_archive, write_cifar10, write_cifar100
from vitcrs.data import (
    CifarSource,
    EpochSampler,
    ImageFolderSource,
    SyntheticSource,
    VisionDataModule,
    random_crop_flip,
    to_model_input,
)
from vitcrs.data import cifar as cifar_mod
from vitcrs.data.cifar import CIFAR100_COARSE_CLASSES, CIFAR100_FINE_CLASSES, CIFAR100_FINE_TO_COARSE
from vitcrs.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


SOURCES = {"imagefolder": ImageFolderSource, "synthetic": SyntheticSource}


def make_dm(source: str, **kw) -> VisionDataModule:
    """A data module of `source` (cifar10 | cifar100 | imagefolder | synthetic; else a CIFAR variant): the
    settings its source class takes go to the source (synthetic_seed: SyntheticSource's seed), the rest to
    the data module."""
    cls = SOURCES.get(source, CifarSource)
    own: dict = {"variant": source, "download": False, "verify_checksum": False} if cls is CifarSource else {}
    if "synthetic_seed" in kw:
        own["seed"] = kw.pop("synthetic_seed")
    own |= {k: kw.pop(k) for k in list(kw) if k in inspect.signature(cls).parameters}
    return VisionDataModule(cls(**own), **{"num_workers": 0, "batch_size": 16, "image_size": 32, **kw})


@pytest.fixture(scope="module")
def c10_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("c10")
    write_cifar10(root, n_train_per_batch=40, n_test=50)
    return root


@pytest.fixture(scope="module")
def c100_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("c100")
    write_cifar100(root, n_train=300, n_test=100)
    return root


# ---------------------------------------------------------------------------------------------- CIFAR


def test_official_cifar100_names_and_mapping():
    assert len(CIFAR100_FINE_CLASSES) == 100 and len(CIFAR100_COARSE_CLASSES) == 20
    assert np.bincount(CIFAR100_FINE_TO_COARSE).tolist() == [5] * 20  # 5 fine classes per superclass
    pairs = zip(CIFAR100_FINE_CLASSES, CIFAR100_FINE_TO_COARSE, strict=True)
    fine = {n: CIFAR100_COARSE_CLASSES[c] for n, c in pairs}
    assert fine["apple"] == "fruit_and_vegetables"
    assert fine["whale"] == "aquatic_mammals"
    assert fine["lawn_mower"] == "vehicles_2"
    assert fine["worm"] == "non-insect_invertebrates"


def test_cifar10_classes_splits_and_labels(c10_root):
    dm = make_dm(source="cifar10", name="cifar10", root=str(c10_root), val_fraction=0.2)
    assert dm.num_classes == 10 and dm.class_names[0] == "airplane" and dm.label_type == "fine"
    assert dm.train_dataset is None  # known without loading the images
    dm.check()
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (160, 40, 50)
    assert dm.train_dataset.images.dtype == torch.uint8 and dm.train_dataset.images.shape[1:] == (3, 32, 32)

    archive = np.concatenate(
        [read_pickle(c10_root / "cifar-10-batches-py" / f"data_batch_{i}")["labels"] for i in range(1, 6)]
    )
    for ds in (dm.train_dataset, dm.val_dataset):
        idx = image_index(ds.images)
        assert ds.labels.tolist() == archive[idx].tolist()
        assert ds.labels.min() >= 0 and ds.labels.max() < 10
    train_idx, val_idx = set(image_index(dm.train_dataset.images)), set(image_index(dm.val_dataset.images))
    assert not train_idx & val_idx and len(train_idx | val_idx) == 200
    test_labels = read_pickle(c10_root / "cifar-10-batches-py" / "test_batch")["labels"]
    assert dm.test_dataset.labels.tolist() == test_labels

    d = dm.describe()
    assert d["name"] == "cifar10" and d["label_type"] == "fine" and d["num_classes"] == 10
    assert (d["num_train"], d["num_val"], d["num_test"]) == (160, 40, 50)


@pytest.mark.parametrize(
    ("label_type", "key", "n"), [("fine", "fine_labels", 100), ("coarse", "coarse_labels", 20)]
)
def test_cifar100_fine_and_coarse_labels(c100_root, label_type, key, n):
    dm = make_dm(source="cifar100", name=f"cifar100_{label_type}", label_type=label_type, root=str(c100_root))
    assert dm.num_classes == n and len(dm.class_names) == n and dm.label_type == label_type
    if label_type == "coarse":
        assert dm.class_names == CIFAR100_COARSE_CLASSES
    dm.check().setup()
    assert len(dm.train_dataset) + len(dm.val_dataset) == 300 and len(dm.test_dataset) == 100
    assert len(dm.val_dataset) == 30
    for split, ds in (("train", dm.train_dataset), ("train", dm.val_dataset), ("test", dm.test_dataset)):
        archive = np.asarray(read_pickle(c100_root / "cifar-100-python" / split)[key])
        assert ds.labels.tolist() == archive[image_index(ds.images)].tolist()  # same image, same label
        assert ds.labels.min() >= 0 and ds.labels.max() < n


def test_split_is_seeded(c10_root):
    def val_images(seed: int) -> set[int]:
        dm = make_dm(source="cifar10", name="cifar10", root=str(c10_root), split_seed=seed)
        dm.setup()
        return set(image_index(dm.val_dataset.images))

    assert val_images(0) == val_images(0)
    assert val_images(0) != val_images(1)


def test_limit_train_keeps_val_and_test(c10_root):
    dm = make_dm(source="cifar10", name="cifar10", root=str(c10_root), limit_train=25)
    dm.setup()
    full = make_dm(source="cifar10", name="cifar10", root=str(c10_root))
    full.setup()
    assert len(dm.train_dataset) == 25 and len(dm.val_dataset) == 20 and len(dm.test_dataset) == 50
    assert set(dm.train_indices.tolist()) <= set(full.train_indices.tolist())
    assert torch.equal(dm.val_indices, full.val_indices)


def test_checksum_rejects_local_archive_unless_opted_out(c10_root):
    dm = make_dm(source="cifar10", name="cifar10", root=str(c10_root), verify_checksum=True)
    with pytest.raises(ConfigError, match=r"data\.source\.verify_checksum=false"):
        dm.check()
    with pytest.raises(ConfigError, match=r"data\.source\.verify_checksum"):
        dm.setup()  # loading without check() is refused the same way
    make_dm(source="cifar10", name="cifar10", root=str(c10_root), verify_checksum=False).check().setup()


def test_missing_root_without_download(tmp_path):
    missing = tmp_path / "nowhere"
    dm = make_dm(source="cifar100", name="cifar100", root=str(missing), download=False)
    assert dm.num_classes == 100  # still known
    with pytest.raises(ConfigError) as err:
        dm.check()
    msg = str(err.value)
    assert str(missing) in msg and "cifar-100-python" in msg and "data.source.download=true" in msg
    with pytest.raises(ConfigError, match="cifar-100-python"):
        dm.prepare_data()


def test_offline_download_fails_with_config_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(cifar_mod, "can_reach", lambda url, timeout=5.0: "www.cs.toronto.edu unreachable")
    dm = make_dm(source="cifar10", name="cifar10", root=str(tmp_path), download=True)
    with pytest.raises(ConfigError, match=r"cifar-10-python\.tar\.gz"):
        dm.check()

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(ConfigError) as err:
        dm.prepare_data()
    assert "data.source.download" in str(err.value) and str(tmp_path) in str(err.value)


def test_tarball_is_extracted(tmp_path):
    folder = write_cifar10(tmp_path / "src", n_train_per_batch=4, n_test=5)
    root = tmp_path / "root"
    root.mkdir()
    tar_archive(folder, root / "cifar-10-python.tar.gz")
    dm = make_dm(source="cifar10", name="cifar10", root=str(root))
    dm.check()
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_dataset) + len(dm.val_dataset) == 20 and len(dm.test_dataset) == 5


def test_verified_tarball_is_hashed_once(tmp_path, monkeypatch):
    folder = write_cifar10(tmp_path / "src", n_train_per_batch=4, n_test=5)
    root = tmp_path / "root"
    root.mkdir()
    tar_archive(folder, root / "cifar-10-python.tar.gz")
    hashed = []
    official = {name: md5 for name, md5 in cifar_mod.CIFAR10.all_files}
    official[cifar_mod.CIFAR10.tarball] = cifar_mod.CIFAR10.tarball_md5

    def fake_md5(path):  # the local archive passes as the official one
        hashed.append(path.name)
        return official[path.name]

    monkeypatch.setattr(cifar_mod, "md5sum", fake_md5)
    dm = make_dm(source="cifar10", name="cifar10", root=str(root), verify_checksum=True)
    dm.check()
    dm.prepare_data()
    dm.setup()
    assert hashed == ["cifar-10-python.tar.gz"]  # by check(); prepare_data and setup trust it

    fresh = make_dm(source="cifar10", name="cifar10", root=str(tmp_path / "again"), verify_checksum=True)
    (tmp_path / "again").mkdir()
    tar_archive(folder, tmp_path / "again" / "cifar-10-python.tar.gz")
    hashed.clear()
    fresh.prepare_data()  # without check(): prepare_data hashes the archive, setup the extracted files
    fresh.setup()
    assert hashed == ["cifar-10-python.tar.gz", *(name for name, _ in cifar_mod.CIFAR10.all_files)]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_pickle(tmp_path, damage):
    folder = write_cifar10(tmp_path, n_train_per_batch=8, n_test=8)
    path = folder / "data_batch_3"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2] if damage == "truncate" else b"not a pickle" * 10)
    dm = make_dm(source="cifar10", name="cifar10", root=str(tmp_path))
    with pytest.raises(ConfigError, match="data_batch_3"):
        dm.check()


def test_a_damaged_unverified_tarball_is_caught_before_anything_is_extracted(tmp_path):
    """check() is the app's pre-flight: it reads an unverified archive's pickles without writing a file."""
    folder = write_cifar10(tmp_path / "src", n_train_per_batch=4, n_test=5)
    (folder / "data_batch_3").write_bytes(b"not a pickle" * 10)
    root = tmp_path / "root"
    root.mkdir()
    tar_archive(folder, root / "cifar-10-python.tar.gz")
    with pytest.raises(ConfigError, match=r"data_batch_3.*corrupt or truncated"):
        make_dm(source="cifar10", root=str(root)).check()
    assert os.listdir(root) == ["cifar-10-python.tar.gz"]


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"source": "cifar1000"}, "data.source.variant"),
        ({"label_type": "medium"}, "data.source.label_type"),
        ({"source": "cifar10", "label_type": "coarse"}, "data.source.label_type"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"val_fraction": -0.1}, "data.val_fraction"),
        ({"mean": [0.5, 0.5]}, "data.mean"),
        ({"std": [0.5, 0.0, 0.5]}, "data.std"),
        ({"num_classes": 1, "source": "synthetic"}, "data.source.num_classes"),
        ({"load_size": 4, "source": "imagefolder"}, "data.source.load_size"),
        ({"limit_train": 0}, "data.limit_train"),
    ],
)
def test_bad_settings_name_the_key(c10_root, kw, key):
    args = {"source": "cifar10", "name": "x", "root": str(c10_root), **kw}
    dm = make_dm(**args)  # construction never raises (Hydra would wrap the error)
    with pytest.raises(ConfigError) as err:
        dm.check()
    msg = str(err.value)
    assert key in msg and "allowed" in msg and "Fix" in msg
    bad = next(iter(kw.values()))
    assert repr(bad) in msg or str(bad) in msg


def test_a_source_takes_only_its_own_settings():
    """Settings of another source cannot be given at all (Hydra: `+data.source.num_classes` is refused)."""
    with pytest.raises(TypeError, match="num_classes"):
        CifarSource(variant="cifar10", num_classes=7)
    with pytest.raises(TypeError, match="load_size"):
        VisionDataModule(SyntheticSource(), load_size=32)


# ---------------------------------------------------------------------------------------------- batches


def test_on_after_batch_transfer_resizes_and_normalises():
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.2, 0.1]
    dm = make_dm(source="synthetic", name="synthetic", image_size=48, mean=mean, std=std)
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    images[0, 0], images[0, 1], images[0, 2] = 255, 102, 0  # a constant colour stays constant when resized
    images[1] = 51
    labels = torch.tensor([3, 1])
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert x.shape == (2, 3, 48, 48) and x.dtype == torch.float32 and y is labels
    expected0 = torch.tensor([(1.0 - 0.5) / 0.25, (0.4 - 0.4) / 0.2, (0.0 - 0.3) / 0.1])
    expected1 = (0.2 - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(x[0, :, 17, 5], expected0, atol=1e-5)
    assert torch.allclose(x[1].amin(dim=(1, 2)), expected1, atol=1e-5)
    assert torch.allclose(x[1].amax(dim=(1, 2)), expected1, atol=1e-5)

    # native size: no interpolation, each pixel maps exactly
    img = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    out = to_model_input(img, 8, mean, std)
    assert torch.allclose(out[0, 1, 2, 3], (img[0, 1, 2, 3] / 255 - 0.4) / 0.2, atol=1e-6)


def test_random_crop_flip_matches_reflect_pad_reference():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, pad=4)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = F.pad(images.float(), (4, 4, 4, 4), mode="reflect")
    for i in range(len(images)):
        candidates = [
            padded[i, :, dy : dy + 8, dx : dx + 8] for dy, dx in itertools.product(range(9), range(9))
        ]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(out[i].float(), c) for c in candidates)


def test_loaders(c10_root):
    dm = make_dm(source="cifar10", name="cifar10", root=str(c10_root), batch_size=64)
    dm.setup()
    train = dm.train_dataloader()
    assert isinstance(train.sampler, EpochSampler) and not train.drop_last
    order = train.sampler.order().tolist()  # shuffled: a permutation other than the archive's order
    assert sorted(order) == list(range(180)) and order != list(range(180))
    batches = list(train)
    assert sum(len(b[1]) for b in batches) == 180  # last partial batch kept
    images, labels = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (64, 3, 32, 32) and labels.dtype == torch.int64
    val_images, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(val_images, dm.val_dataset.images[: len(val_images)])  # no shuffle, no augmentation
    assert not isinstance(dm.test_dataloader().sampler, RandomSampler)

    workers = make_dm(source="synthetic", name="s", num_workers=2)
    workers.setup()
    assert workers.train_dataloader().persistent_workers and workers.train_dataloader().num_workers == 2


# ---------------------------------------------------------------------------------------------- imagefolder


def _write_tree(root: Path) -> dict[str, dict[str, tuple[int, int, int]]]:
    colours = {"zebra": (250, 10, 10), "ant": (10, 250, 10), "moth": (10, 10, 250)}
    counts = {"train": {"zebra": 3, "ant": 2, "moth": 4}, "test": {"zebra": 1, "ant": 2, "moth": 1}}
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                size = (20 + 7 * i, 16 + 3 * i)  # various sizes, resized to load_size
                ext = "png" if i % 2 == 0 else "jpg"
                Image.new("RGB", size, colours[cls]).save(root / split / cls / f"{i}.{ext}")
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    return counts


def test_imagefolder(tmp_path, monkeypatch):
    root = tmp_path / "tree"
    counts = _write_tree(root)
    dm = make_dm(source="imagefolder", name="tree", root=str(root), load_size=12, val_fraction=0.25)
    assert dm.class_names == ["ant", "moth", "zebra"] and dm.num_classes == 3  # sorted, no decoding yet
    dm.check().setup()
    assert len(dm.train_dataset) + len(dm.val_dataset) == 9 and len(dm.test_dataset) == 4
    assert len(dm.val_dataset) == 2
    assert dm.test_dataset.images.shape == (4, 3, 12, 12) and dm.test_dataset.images.dtype == torch.uint8
    assert dm.test_dataset.labels.tolist() == [0, 0, 1, 2]
    all_train = torch.cat([dm.train_dataset.labels, dm.val_dataset.labels])
    assert torch.bincount(all_train).tolist() == [counts["train"][c] for c in ("ant", "moth", "zebra")]
    zebra = dm.test_dataset.images[3].float().mean(dim=(1, 2))  # a PNG: exact colour
    assert torch.allclose(zebra, torch.tensor([250.0, 10.0, 10.0]), atol=1)

    cache = root / ".vitcrs_cache_12.pt"
    assert cache.is_file()
    from vitcrs.data import imagefolder

    def no_decoding(*a, **k):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(imagefolder, "_decode", no_decoding)
    again = make_dm(source="imagefolder", name="tree", root=str(root), load_size=12)
    again.setup()
    assert torch.equal(again.test_dataset.images, dm.test_dataset.images)


def test_imagefolder_errors(tmp_path):
    root = tmp_path / "tree"
    _write_tree(root)
    (root / "test" / "moth").rename(root / "test" / "butterfly")
    with pytest.raises(ConfigError, match="butterfly"):
        make_dm(source="imagefolder", name="t", root=str(root)).check()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="train"):
        make_dm(source="imagefolder", name="t", root=str(empty)).check()
    with pytest.raises(ConfigError, match=r"data\.root"):
        _ = make_dm(source="imagefolder", name="t", root=str(empty)).num_classes

    # data.root one level too high: the message points at the tree
    with pytest.raises(ConfigError, match=re.escape(f"data.root={tmp_path / 'tree'}")):
        make_dm(source="imagefolder", name="t", root=str(tmp_path)).check()

    # a train class folder with no images (ant keeps only its notes.txt): named, the others not
    no_images = tmp_path / "no_images"
    _write_tree(no_images)
    for f in (no_images / "train" / "ant").glob("*.*g"):
        f.unlink()
    with pytest.raises(ConfigError, match=r"train class folders without images \(ant\)"):
        make_dm(source="imagefolder", name="t", root=str(no_images)).check()


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_balanced_and_learnable():
    def build(seed: int = 0) -> VisionDataModule:
        dm = make_dm(
            source="synthetic",
            name="synthetic",
            num_classes=5,
            num_train=500,
            num_test=100,
            native_size=16,
            synthetic_seed=seed,
        )
        dm.setup()
        return dm

    a, b, c = build(), build(), build(seed=1)
    assert a.num_classes == 5 and a.class_names[0] == "class_0"
    assert torch.equal(a.train_dataset.images, b.train_dataset.images)
    assert torch.equal(a.test_dataset.labels, b.test_dataset.labels)
    assert not torch.equal(a.train_dataset.images, c.train_dataset.images)
    all_train = torch.cat([a.train_dataset.labels, a.val_dataset.labels])
    assert torch.bincount(all_train).tolist() == [100] * 5
    assert torch.bincount(a.test_dataset.labels).tolist() == [20] * 5
    assert a.train_dataset.images.shape[1:] == (3, 16, 16)

    # learnable: class means of the train images classify the test images far above chance (20 %)
    x = a.train_dataset.images.float().flatten(1)
    centroids = torch.stack([x[a.train_dataset.labels == k].mean(0) for k in range(5)])
    pred = torch.cdist(a.test_dataset.images.float().flatten(1), centroids).argmin(1)
    assert (pred == a.test_dataset.labels).float().mean() > 0.8


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("name", "source", "label_type", "classes"),
    [
        ("cifar10", "cifar10", "fine", 10),
        ("cifar100", "cifar100", "fine", 100),
        ("cifar100_coarse", "cifar100", "coarse", 20),
        ("imagefolder", "imagefolder", "fine", None),
        ("synthetic", "synthetic", "fine", 10),
    ],
)
def test_dataset_configs_instantiate(name, source, label_type, classes, tmp_path):
    path = REPO / "conf" / "dataset" / f"{name}.yaml"
    assert path.read_text().splitlines()[0] == "# @package data"
    node = OmegaConf.load(path)
    assert node.source._target_ == f"vitcrs.data.{SOURCES.get(source, CifarSource).__name__}"
    common = OmegaConf.load(REPO / "conf" / "data" / "default.yaml")
    assert common._target_ == "vitcrs.data.VisionDataModule"
    local = {"root": str(tmp_path), "num_workers": 0, "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    dm = instantiate(OmegaConf.merge(common, node, local, {"seed": 0}))
    assert isinstance(dm, VisionDataModule) and dm.label_type == label_type and dm.source.kind == source
    assert dm.name == (tmp_path.name if name == "imagefolder" else name)  # a folder tree: the folder's name
    if classes is not None:
        assert dm.num_classes == classes
    if source == "synthetic":
        dm.check()


def test_no_stray_files_written(c10_root):
    before = sorted(os.listdir(c10_root))
    make_dm(source="cifar10", name="cifar10", root=str(c10_root)).check()
    assert sorted(os.listdir(c10_root)) == before


# ---------------------------------------------------------------------------------------------- Lightning


@pytest.mark.filterwarnings("ignore:Total length of `DataLoader`")
def test_trainer_receives_normalised_float_batches():
    import lightning as L

    seen = []

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(3 * 24 * 24, 4)

        def training_step(self, batch, batch_idx):
            x, y = batch
            seen.append((tuple(x.shape[1:]), x.dtype, y.dtype))
            return F.cross_entropy(self.head(x.flatten(1)), y)

        def validation_step(self, batch, batch_idx):
            seen.append(("val", tuple(batch[0].shape[1:])))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    for val_fraction in (0.25, 0.0):  # 0: an empty validation loader is fine
        seen.clear()
        dm = make_dm(
            source="synthetic",
            name="synthetic",
            num_classes=4,
            num_train=64,
            num_test=16,
            native_size=16,
            image_size=24,
            val_fraction=val_fraction,
        )
        trainer = L.Trainer(
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(Probe(), datamodule=dm.check())
        assert ((3, 24, 24), torch.float32, torch.int64) in seen
        assert (("val", (3, 24, 24)) in seen) == (val_fraction > 0)
        assert all(s[0] == "val" or s == ((3, 24, 24), torch.float32, torch.int64) for s in seen)
