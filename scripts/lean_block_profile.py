"""Where a training step's CPU time goes, by torch.profiler: exact vs the lean block (x1 kept; x alone).

    OMP_NUM_THREADS=1 python scripts/lean_block_profile.py --attn eager --layers 2 --batch-size 16

One ViT-B/16-shaped model (random init), one thread; for each variant one warm-up step, then two profiled
training steps (forward, loss, backward; no optimizer). Prints each variant's total self CPU time and its ops
by self CPU time (the top --rows), so the recomputation, the sampled GEMMs and the sampling's own ops can be
read side by side.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers import ViTConfig, ViTForImageClassification
from transformers.utils import logging as hf_logging

from vitcrs.crs import CRSConfig, inject

VARIANTS = {
    "exact": None,
    "lean@0.3": CRSConfig(ratio=0.3),
    "leanx@0.3": CRSConfig(ratio=0.3, keep_mid=False),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attn", default="eager", choices=("eager", "sdpa"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rows", type=int, default=15, help="ops listed per variant")
    args = p.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = ViTConfig(num_hidden_layers=args.layers, num_labels=10, attn_implementation=args.attn)
    base = ViTForImageClassification(config).train()
    x, y = torch.randn(args.batch_size, 3, 224, 224), torch.randint(0, 10, (args.batch_size,))

    def step(model: torch.nn.Module) -> None:
        F.cross_entropy(model(x).logits, y).backward()
        model.zero_grad(set_to_none=True)

    print(f"{args.attn} fp32, {args.layers} layers, batch {args.batch_size}, 1 thread, 2 profiled steps")
    for name, cfg in VARIANTS.items():
        model = copy.deepcopy(base)
        if cfg is not None:
            inject(model, cfg)
        step(model)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(model)
            step(model)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        print(f"\n===== {name}: {total:.2f} s self CPU time")
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=36))


if __name__ == "__main__":
    main()
