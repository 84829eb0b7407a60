"""Host memory of `crs.prob=sample_cache` per training image: measured after one step vs the analytic figure.

    python scripts/sample_cache_memory.py > docs/results/sample_cache_memory.md

For ViT-B/16 and ViT-Tiny/16 shapes (random init, eager attention) with the study's targets, at 112, 224 and
384 px, bf16 and uint8 entries: one training step (batch 2) fills two of eight cache rows; the measured bytes
are the entries' host bytes / 8 (`sample_cache_nbytes`), the analytic ones `sample_cache_bytes_per_image`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

from vitcrs.crs import (
    TARGET_SETS,
    CRSConfig,
    attach_sample_cache,
    inject,
    sample_cache_bytes_per_image,
    sample_cache_nbytes,
    training_batch,
)
from vitcrs.units import GIB

MODELS = {  # hidden, layers, heads, mlp
    "ViT-B/16": (768, 12, 12, 3072),
    "ViT-Tiny/16": (192, 12, 3, 768),
}
SIZES = (112, 224, 384)
FORMATS = ("bfloat16", "uint8")
ROWS, CIFAR_TRAIN = 8, 45_000  # cache rows allocated here; CIFAR's training images (val_fraction 0.1)
TARGETS = TARGET_SETS["study"]  # the study's set


def measured_per_image(shape: tuple[int, int, int, int], size: int, fmt: str) -> int:
    hidden, layers, heads, mlp = shape
    config = ViTConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
        image_size=size, patch_size=16, num_labels=10, attn_implementation="eager",
    )  # fmt: skip
    cfg = CRSConfig(0.3, prob="sample_cache", cache_format=fmt)
    model = inject(ViTForImageClassification(config), cfg, TARGETS)
    attach_sample_cache(model, ROWS)
    with training_batch(model, torch.tensor([1, 5])):
        F.cross_entropy(model(torch.randn(2, 3, size, size)).logits, torch.tensor([0, 1])).backward()
    return sample_cache_nbytes(model) // ROWS


def main() -> None:
    torch.manual_seed(0)
    print("| model | px | tokens | format | measured B/image | analytic B/image | KiB/image | GiB, 45,000 |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for name, shape in MODELS.items():
        hidden, layers, heads, _ = shape
        for size in SIZES:
            tokens = (size // 16) ** 2 + 1
            for fmt in FORMATS:
                got = measured_per_image(shape, size, fmt)
                want = sample_cache_bytes_per_image(tokens, hidden, heads, layers, TARGETS, fmt)
                print(
                    f"| {name} | {size} | {tokens} | {fmt} | {got:,} | {want:,} | {want / 1024:.1f} | "
                    f"{want * CIFAR_TRAIN / GIB:.2f} |"
                )
    print()
    print(f"torch {torch.__version__}; targets: {', '.join(TARGETS)}; per process (each")
    print("data-parallel rank keeps its own cache).")


if __name__ == "__main__":
    main()
