"""Saved-for-backward bytes of one ViT-B/16-shaped block (batch 64, 197 tokens), exact vs CRS, on CPU.

    python scripts/crs_block_memory.py > docs/results/crs_block_memory.md

Measures with `SavedTensorsMeter` (distinct storages, parameters excluded) and prints a Markdown table
with the analytic ideal (`vit_block_saved_bytes`) beside each measurement.
"""

from __future__ import annotations

import copy
import platform

import torch
import transformers
from transformers import ViTConfig, ViTForImageClassification

from vitcrs.crs import TARGET_SETS, CRSConfig, SavedTensorsMeter, inject, vit_block_saved_bytes
from vitcrs.units import MIB

SHAPE = (64, 197, 768, 12, 3072)  # batch, tokens, hidden, heads, mlp
MEASURED_SETS = ("study", "linears", "all", "lean_all")  # names in vitcrs.crs.TARGET_SETS


def measure(model: ViTForImageClassification, autocast: bool) -> int:
    h = torch.randn(SHAPE[0], SHAPE[1], SHAPE[2], requires_grad=True)
    autocast_ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with autocast_ctx, SavedTensorsMeter(exclude=model.parameters()) as meter:
        out = model.vit.layers[0](h)
    del out
    return meter.bytes


def main() -> None:
    torch.manual_seed(0)
    config = ViTConfig(num_hidden_layers=1, num_labels=10, attn_implementation="eager")
    base = ViTForImageClassification(config)
    print(f"One ViT-B/16 block, batch {SHAPE[0]}, {SHAPE[1]} tokens, eager attention, WTA-CRS. "
          f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}.\n")  # fmt: skip
    print(
        "| precision | targets | ratio | saved MiB | reduction vs exact | analytic ideal | measured/ideal |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for autocast in (False, True):
        precision = "bf16 autocast" if autocast else "fp32"
        exact = measure(base, autocast)
        ideal = vit_block_saved_bytes(*SHAPE, autocast=autocast)
        print(f"| {precision} | exact | 1 | {exact / MIB:.1f} | 1.000x | 1.000x | {exact / ideal:.4f} |")
        for name in MEASURED_SETS:
            targets = TARGET_SETS[name]
            for ratio in (0.5, 0.3):
                cfg = CRSConfig(ratio=ratio)
                saved = measure(inject(copy.deepcopy(base), cfg, targets), autocast)
                ideal = vit_block_saved_bytes(*SHAPE, cfg, targets, autocast)
                print(f"| {precision} | {name} | {ratio} | {saved / MIB:.1f} | {exact / saved:.3f}x | "
                      f"{exact / ideal:.3f}x | {saved / ideal:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
