"""Correctness smoke of every bench target set and model family on one device, in fp32 and bf16 autocast.

    python -m vitcrs.gpu_check.smoke --device cuda --out smoke.json

For each model family (`FAMILIES`: a small random-init network of each, with the family's own block parts:
DeiT's two heads, DINOv2's SwiGLU MLP and layer scale, timm's fused qkv and layer scale), each target set the
bench runs (`vitcrs.bench.grid.BENCH_TARGET_SETS`, as it is at run time), each attention implementation it
works with (eager; for the Hugging Face ViT sdpa too when it samples no attention matmul) and each precision,
on one random batch, against the same network without CRS:

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

from vitcrs.bench.grid import BENCH_TARGET_SETS
from vitcrs.crs import MATMUL_TARGETS, TARGET_SETS, CRSConfig, crs_state, inject
from vitcrs.errors import ConfigError
from vitcrs.models import model_family, model_logits

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


# The model families of the smoke; the first runs sdpa too (the attention implementation is the family's own
# code path only in eager attention, which the others run).
FAMILIES = ("hf_vit", "hf_deit", "hf_dinov2", "timm")


def model_node(family: str, shape: dict, attn: str) -> dict:
    """The `model` config node of `family`'s smoke network at `shape` (a SHAPES entry), with `attn`."""
    hidden, mlp = shape["hidden_size"], shape["intermediate_size"]
    arch = {k: shape[k] for k in ("image_size", "patch_size", "hidden_size", "num_hidden_layers",
                                  "num_attention_heads")}  # fmt: skip
    if family == "hf_vit":
        return {"family": family, "name_or_path": None, "attn_implementation": attn,
                "config": {**arch, "intermediate_size": mlp}}  # fmt: skip
    if family == "hf_deit":  # both heads
        return {"family": family, "name_or_path": None, "attn_implementation": attn, "with_teacher": True,
                "config": {**arch, "intermediate_size": mlp}}  # fmt: skip
    if family == "hf_dinov2":  # SwiGLU MLP, layer scale
        config = {**arch, "mlp_ratio": mlp // hidden, "use_swiglu_ffn": True, "layerscale_value": 0.5}
        return {"family": family, "name_or_path": None, "attn_implementation": attn, "config": config}
    if family == "timm":  # fused qkv, layer scale
        config = {"img_size": shape["image_size"], "patch_size": shape["patch_size"], "embed_dim": hidden,
                  "depth": shape["num_hidden_layers"], "num_heads": shape["num_attention_heads"],
                  "mlp_ratio": mlp / hidden, "init_values": 0.5}  # fmt: skip
        return {"family": family, "name": "vit_tiny_patch16_224", "pretrained": False,
                "attn_implementation": attn, "config": config}  # fmt: skip
    raise ValueError(f"no smoke network for family {family!r}")


def cases(
    target_sets: dict[str, tuple[str, ...]], families: Sequence[str] = FAMILIES[:1]
) -> list[tuple[str, str, str, str]]:
    """(family, target set, attention, precision) for every family and set; sdpa for the first family
    only, and only where no attention matmul is sampled."""
    out = []
    for family in families:
        for name, targets in target_sets.items():
            sdpa = family == FAMILIES[0] and not set(targets) & set(MATMUL_TARGETS)
            out += [(family, name, a, p) for a in ("eager", "sdpa")[: 2 if sdpa else 1] for p in PRECISIONS]
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
        logits = model_logits(model, x)
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
    target_set: str,
    attn: str,
    precision: str,
    device: torch.device,
    shape: dict,
    draws: int,
    seed: int = 0,
    family: str = FAMILIES[0],
) -> dict:
    """One case's record: its measured errors, the limits, and `ok` (every check passed)."""
    batch = shape["batch"]
    torch.manual_seed(seed)
    node = model_node(family, shape, attn)
    base = model_family(node).build(node, 10).to(device).train()
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
        "family": family,
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


def available(families: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The families whose networks can be built here, and why the others cannot (timm not installed)."""
    usable, missing = [], {}
    for family in families:
        try:
            model_family(model_node(family, SHAPES["cpu"], "eager"))
        except ConfigError as err:
            missing[family] = str(err)
        else:
            usable.append(family)
    return usable, missing


def case_name(record: dict) -> str:
    return (
        f"{record.get('family', FAMILIES[0])}/{record['target_set']}/{record['attn']}/{record['precision']}"
    )


def run(
    device: torch.device,
    draws: int,
    out: Path,
    target_sets: Sequence[str] | None = None,
    families: Sequence[str] = FAMILIES,
) -> list[dict]:
    """Every case, each record written to `out` (JSON) as soon as it is done; returns the records. A family
    that cannot be built here (timm not installed) is left out, and named in the JSON's meta."""
    names = {k: TARGET_SETS[k] for k in BENCH_TARGET_SETS if target_sets is None or k in target_sets}
    shape = SHAPES["cuda" if device.type == "cuda" else "cpu"]
    usable, missing = available(families)
    meta = {"device": str(device), "torch": torch.__version__, "shape": shape, "draws": draws,
            "families": usable, "families_left_out": missing}  # fmt: skip
    for family, why in missing.items():
        print(f"smoke: family {family} left out: {why}", flush=True)
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    records: list[dict] = []
    for family, name, attn, precision in cases(names, usable):
        start = time.perf_counter()
        try:
            record = check_case(name, attn, precision, device, shape, draws, family=family)
        except Exception as exc:  # a crash is a failed case, reported with the others
            record = {"family": family, "target_set": name, "attn": attn, "precision": precision, "ok": False,
                      "failures": [f"{type(exc).__name__}: {exc}"]}  # fmt: skip
        record["seconds"] = round(time.perf_counter() - start, 2)
        records.append(record)
        out.write_text(json.dumps({"meta": meta, "cases": records}, indent=2) + "\n")
        status = "ok" if record["ok"] else "FAILED: " + "; ".join(record["failures"])
        print(f"smoke {case_name(record)}: {status} ({record['seconds']} s)", flush=True)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vitcrs.gpu_check.smoke", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    p.add_argument("--draws", type=int, default=128, help="sampled gradients per case (default 128)")
    p.add_argument("--targets", help="comma-separated target sets (default: all of BENCH_TARGET_SETS)")
    p.add_argument("--families", help=f"comma-separated model families (default: {','.join(FAMILIES)})")
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
    families = args.families.split(",") if args.families else FAMILIES
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(f"error: --families {unknown}: choose from {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    records = run(device, args.draws, args.out, sets, families)
    failed = [case_name(r) for r in records if not r["ok"]]
    if failed:
        print(f"smoke: {len(failed)} of {len(records)} cases failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or not records else 0


if __name__ == "__main__":
    raise SystemExit(main())
