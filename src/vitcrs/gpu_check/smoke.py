"""Correctness smoke of every bench target set on one device, in fp32 and bf16 autocast.

    python -m vitcrs.gpu_check.smoke --device cuda --out smoke.json

For each target set the bench runs (`vitcrs.bench.grid.BENCH_TARGET_SETS`, as it is at run time), each
attention implementation it works with (eager; sdpa too when it samples no attention matmul) and each
precision, on a small random-init ViT and one random batch, against the same network without CRS:

- forward: the logits at ratio 0.3 equal the exact ones (relative error ≤ `FORWARD_TOL`);
- ratio 1: every gradient equals the exact one (relative error over all parameters ≤ `GRAD_TOL`);
- unbiasedness: the mean of `draws` sampled gradients at ratio 0.3 lies within Monte-Carlo error of the exact
  gradient: ‖mean − g‖² / (tr Cov / draws + (tol · ‖g‖)²) ≤ `BIAS_LIMIT`, where tr Cov is estimated from the
  same draws (about 1 for an unbiased estimator; a wrong 1/(k·p) scale gives far more);
- no NaN or inf in any logit or gradient.

The sampled model's stream (`crs_state(model).generator`) is seeded, so sampling uses its own generator.
Writes one JSON record per case as soon as it is done (the file is rewritten after each), and exits 1 if any
case fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

from vitcrs.bench.grid import BENCH_TARGET_SETS
from vitcrs.crs import MATMUL_TARGETS, TARGET_SETS, CRSConfig, crs_state, inject

PRECISIONS = ("fp32", "bf16-mixed")
FORWARD_TOL = {"fp32": 1e-5, "bf16-mixed": 1e-2}  # relative error of the logits at ratio 0.3
GRAD_TOL = {"fp32": 1e-5, "bf16-mixed": 2e-2}  # relative error of all gradients at ratio 1
ROUNDING = {"fp32": 1e-5, "bf16-mixed": 1e-2}  # rounding floor of the bias check, relative to ‖g‖
BIAS_LIMIT = 6.0  # ‖mean − g‖² over its Monte-Carlo expectation (+ rounding floor): ~1 when unbiased
RATIO = 0.3

# ViT shapes: `cuda` fills a GPU launch a little, `cpu` (the dry run) is as small as a ViT gets
SHAPES = {
    "cuda": {"image_size": 64, "patch_size": 8, "hidden_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 256, "batch": 16},
    "cpu": {"image_size": 16, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 64, "batch": 4},
}  # fmt: skip


def cases(target_sets: dict[str, tuple[str, ...]]) -> list[tuple[str, str, str]]:
    """(target set, attention, precision) for every set, sdpa only where no attention matmul is sampled."""
    out = []
    for name, targets in target_sets.items():
        attns = ("eager",) if set(targets) & set(MATMUL_TARGETS) else ("eager", "sdpa")
        out += [(name, a, p) for a in attns for p in PRECISIONS]
    return out


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()


def _step(model, x, y, device, precision) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, flattened gradients) of one forward/backward of the cross-entropy loss."""
    model.zero_grad(set_to_none=True)
    with _autocast(device, precision):
        logits = model(x).logits
    F.cross_entropy(logits.float(), y).backward()
    return logits.detach(), _flat_grads(model)


def bias_ratio(
    total: torch.Tensor, total_sq: float, draws: int, exact: torch.Tensor, rounding: float
) -> tuple[float, float]:
    """(‖mean − g‖² / (tr Cov / draws + (rounding · ‖g‖)²), root-mean-square relative error of one draw).

    `total` is the sum of the `draws` sampled gradients, `total_sq` the sum of their squared norms; tr Cov is
    estimated from them without bias. The first figure is about 1 for an unbiased estimator.
    """
    mean = total / draws
    trace_cov = max((total_sq - draws * mean.square().sum().item()) / max(draws - 1, 1), 0.0)
    bias_sq = (mean - exact).square().sum().item()
    norm = exact.norm().item()
    floor = trace_cov / draws + (rounding * norm) ** 2
    return (bias_sq / floor if floor > 0 else 0.0), (trace_cov + bias_sq) ** 0.5 / max(norm, 1e-30)


def check_case(
    target_set: str, attn: str, precision: str, device: torch.device, shape: dict, draws: int, seed: int = 0
) -> dict:
    """One case's record: its measured errors, the limits, and `ok` (every check passed)."""
    shape = dict(shape)
    batch = shape.pop("batch")
    torch.manual_seed(seed)
    config = ViTConfig(**shape, num_labels=10, attn_implementation=attn)
    base = ViTForImageClassification(config).to(device).train()
    x = torch.randn(batch, 3, shape["image_size"], shape["image_size"], device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    targets = TARGET_SETS[target_set]
    ref_logits, g = _step(base, x, y, device, precision)

    one = inject(copy.deepcopy(base), CRSConfig(ratio=1.0), targets)
    _, g1 = _step(one, x, y, device, precision)
    sampled = inject(copy.deepcopy(base), CRSConfig(ratio=RATIO), targets)
    crs_state(sampled).generator.manual_seed(seed)
    total = torch.zeros_like(g)
    total_sq = torch.zeros(1, dtype=torch.float64, device=device)
    finite = bool(torch.isfinite(ref_logits).all() and torch.isfinite(g).all() and torch.isfinite(g1).all())
    forward_err = 0.0
    for _ in range(draws):
        logits, gs = _step(sampled, x, y, device, precision)
        forward_err = max(forward_err, _rel(logits, ref_logits))
        finite = finite and bool(torch.isfinite(logits).all() and torch.isfinite(gs).all())
        total += gs
        total_sq += gs.square().sum()
    bias, rel_err = bias_ratio(total, total_sq.item(), draws, g, ROUNDING[precision])
    record = {
        "target_set": target_set,
        "targets": list(targets),
        "attn": attn,
        "precision": precision,
        "ratio": RATIO,
        "draws": draws,
        "forward_rel_err": forward_err,
        "forward_tol": FORWARD_TOL[precision],
        "ratio1_grad_rel_err": _rel(g1, g),
        "grad_tol": GRAD_TOL[precision],
        "sampled_grad_rel_err": rel_err,
        "bias_ratio": bias,
        "bias_limit": BIAS_LIMIT,
        "finite": finite,
    }
    failures = []
    if not finite:
        failures.append("NaN or inf in logits or gradients")
    if not forward_err <= FORWARD_TOL[precision]:
        failures.append(f"forward differs from exact (rel err {forward_err:.2e})")
    if not record["ratio1_grad_rel_err"] <= GRAD_TOL[precision]:
        failures.append(f"ratio-1 gradients differ from exact (rel err {record['ratio1_grad_rel_err']:.2e})")
    if not record["bias_ratio"] <= BIAS_LIMIT:
        failures.append(f"mean of {draws} sampled gradients is biased (ratio {record['bias_ratio']:.1f})")
    record["ok"] = not failures
    record["failures"] = failures
    return record


def run(device: torch.device, draws: int, out: Path, target_sets: Sequence[str] | None = None) -> list[dict]:
    """Every case, each record written to `out` (JSON) as soon as it is done; returns the records."""
    names = {k: TARGET_SETS[k] for k in BENCH_TARGET_SETS if target_sets is None or k in target_sets}
    shape = SHAPES["cuda" if device.type == "cuda" else "cpu"]
    meta = {"device": str(device), "torch": torch.__version__, "shape": shape, "draws": draws}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    records: list[dict] = []
    for name, attn, precision in cases(names):
        start = time.perf_counter()
        try:
            record = check_case(name, attn, precision, device, shape, draws)
        except Exception as exc:  # a crash is a failed case, reported with the others
            record = {"target_set": name, "attn": attn, "precision": precision, "ok": False,
                      "failures": [f"{type(exc).__name__}: {exc}"]}  # fmt: skip
        record["seconds"] = round(time.perf_counter() - start, 2)
        records.append(record)
        out.write_text(json.dumps({"meta": meta, "cases": records}, indent=2) + "\n")
        status = "ok" if record["ok"] else "FAILED: " + "; ".join(record["failures"])
        print(f"smoke {name}/{attn}/{precision}: {status} ({record['seconds']} s)", flush=True)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vitcrs.gpu_check.smoke", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    p.add_argument("--draws", type=int, default=128, help="sampled gradients per case (default 128)")
    p.add_argument("--targets", help="comma-separated target sets (default: all of BENCH_TARGET_SETS)")
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no GPU: use --device cpu", file=sys.stderr)
        return 2
    if args.draws < 2:
        print(
            f"error: --draws={args.draws}: at least 2 draws are needed to estimate the variance",
            file=sys.stderr,
        )
        return 2
    sets = args.targets.split(",") if args.targets else None
    records = run(device, args.draws, args.out, sets)
    failed = [f"{r['target_set']}/{r['attn']}/{r['precision']}" for r in records if not r["ok"]]
    if failed:
        print(f"smoke: {len(failed)} of {len(records)} cases failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or not records else 0


if __name__ == "__main__":
    raise SystemExit(main())
