"""The payload a GPU check reads (data archive, checkpoint), and tiny stand-ins of it for the CPU dry run.

A payload folder (`scripts/gpu_payload.sh` lays it out, default `<repo>/.carry`) holds

    data/cifar10-jpeg.tar.xz           a `cifar10-jpeg/{train,test}/<class>/<image>` tree, archived
    models/vit-tiny-patch16-224/       a `save_pretrained` ViT checkpoint
    wheels/                            what `scripts/gpu_check.sh` installs (not read here)

`write_dry_run_payload` writes a payload of the same layout with a 2-block random-init 32 px ViT and a few
generated JPEGs per class, so the dry run goes through the same extraction and loading code.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

DATA_ARCHIVE = "data/cifar10-jpeg.tar.xz"
TREE = "cifar10-jpeg"  # the archive's top folder
MODEL = "models/vit-tiny-patch16-224"
_SAFE = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # refuse links and paths out of `into`


@dataclass(frozen=True)
class Payload:
    """Where a payload's data archive and checkpoint are."""

    root: Path

    @property
    def archive(self) -> Path:
        return self.root / DATA_ARCHIVE

    @property
    def model(self) -> Path:
        return self.root / MODEL

    def missing(self) -> list[str]:
        """The files a check needs that are not there."""
        need = [self.archive, self.model / "config.json", self.model / "model.safetensors"]
        return [str(p) for p in need if not p.is_file()]


def extract(archive: Path, into: Path) -> Path:
    """Extract `archive` (once: a marker file records a finished extraction) and return its image tree."""
    tree, marker = into / TREE, into / f".{TREE}.extracted"
    if not (marker.is_file() and marker.read_text() == f"{archive.resolve()} {archive.stat().st_size}"):
        into.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(into, **_SAFE)
        marker.write_text(f"{archive.resolve()} {archive.stat().st_size}")
    if not (tree / "train").is_dir() or not (tree / "test").is_dir():
        raise FileNotFoundError(f"{archive} did not hold {TREE}/train and {TREE}/test")
    return tree


def write_dry_run_payload(root: Path, classes: int = 3, train: int = 16, test: int = 4) -> Payload:
    """A payload of tiny stand-ins: a random-init 32 px ViT checkpoint and a few JPEGs per class."""
    import numpy as np
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification

    payload = Payload(root)
    vit = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1000,
    )
    ViTForImageClassification(vit).save_pretrained(payload.model)
    (payload.model / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_processor_type": "ViTImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        )
    )
    rng = np.random.default_rng(0)
    src = root / "tree" / TREE
    for split, count in (("train", train), ("test", test)):
        for c in range(classes):
            folder = src / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = (
                    rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) // 2 + 40 * c
                )  # class shifts colour
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
    payload.archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(payload.archive, "w:xz") as tar:
        tar.add(src, arcname=TREE)
    return payload
