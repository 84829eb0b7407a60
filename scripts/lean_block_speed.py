"""Interleaved CPU step times of exact / lean-block / checkpointing variants of one ViT-B/16-shaped model.

Every variant is built from the same weights and kept alive; each round times one training step (forward,
loss, backward and, with --optimizer, the AdamW update) of every variant in turn, starting one variant later
each round, so drift on a shared machine and the order of turns hit all alike. Reports the median wall time
and the median process CPU time per step (the latter is less sensitive to other processes when run with one
thread), their ratios against the first variant and against checkpointing alone, and the range of the CPU
time ratio against the first variant over the rounds (each round's pair timed back to back).

    python scripts/lean_block_speed.py --attn eager --precision fp32 --layers 2 --batch-size 8 --rounds 4

Variants (--variants, comma-separated), parts joined by "+": exact; lean@R (the lean block at ratio R;
lean@R:split with crs.budget=split); leanx@R (the lean block keeping its input alone, crs.keep_mid=false);
ckpt (activation checkpointing); inbwd (the AdamW update inside backward, optim.in_backward; implies
--optimizer for that variant); bf16 (the lean block's kept stream in bfloat16, crs.keep_dtype=bfloat16).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification
from transformers.utils import logging as hf_logging

from vitcrs.crs import CRSConfig, inject
from vitcrs.models.optim import AdamWInBackward, OptimConfig

VARIANTS = ("exact", "lean@0.3", "lean@0.5", "leanx@0.3", "ckpt", "ckpt+lean@0.3")


def build(base: ViTForImageClassification, name: str, optimizer: bool):
    """The model of variant `name` (see the module docstring) and its AdamW (None without an update)."""
    model = copy.deepcopy(base)
    parts = name.split("+")
    for part in parts:
        kind, _, setting = part.partition("@")
        ratio, _, budget = setting.partition(":")
        if kind in ("lean", "leanx"):
            keep_dtype = "bfloat16" if "bf16" in parts else None
            budget = budget or "uniform"
            cfg = CRSConfig(ratio=float(ratio), keep_mid=kind == "lean", budget=budget, keep_dtype=keep_dtype)
            inject(model, cfg, ["lean_block"])
        elif part == "ckpt":
            model.activation_checkpointing_enable()
    config = OptimConfig(lr=1e-5, in_backward="inbwd" in parts)
    adamw = AdamWInBackward if config.in_backward else torch.optim.AdamW
    opt = (
        adamw(config.param_groups(model.parameters()), lr=config.lr)
        if optimizer or config.in_backward
        else None
    )
    return model.train(), opt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attn", choices=("eager", "sdpa"), default="eager")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--optimizer", action="store_true", help="time the AdamW update too (every variant)")
    args = p.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ViTConfig(num_hidden_layers=args.layers, num_labels=10, attn_implementation=args.attn)
    base = ViTForImageClassification(config)
    x, y = torch.randn(args.batch_size, 3, 224, 224), torch.randint(0, 10, (args.batch_size,))
    models = {name: build(base, name, args.optimizer) for name in args.variants.split(",")}

    def step(variant) -> None:
        model, opt = variant
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = F.cross_entropy(model(x).logits.float(), y)
        loss.backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)

    wall: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for model in models.values():  # warm-up
        step(model)
    names = list(models)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            step(models[name])
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    med = {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in models}
    ref, ckpt = med[names[0]], med.get("ckpt")
    print(
        f"{args.attn} {args.precision}, {args.layers} layers, batch {args.batch_size}, "
        f"{args.threads} thread(s){', AdamW update timed' if args.optimizer else ''}"
    )
    for name, (c, w) in med.items():
        vs_ckpt = f" | vs ckpt: cpu {ckpt[0] / c:.3f}x wall {ckpt[1] / w:.3f}x" if ckpt else ""
        print(
            f"{name:14s} cpu {c:.3f}s wall {w:.3f}s | "
            f"vs exact: cpu {ref[0] / c:.3f}x wall {ref[1] / w:.3f}x{vs_ckpt}"
        )
    print(f"per round, cpu time of {names[0]} / variant (min-max over {args.rounds} rounds):")
    for name in names[1:]:
        ratios = [a / b for a, b in zip(cpu[names[0]], cpu[name], strict=True)]
        print(f"{name:14s} {min(ratios):.3f}x-{max(ratios):.3f}x")


if __name__ == "__main__":
    main()
