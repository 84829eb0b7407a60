"""Run a list of configurations one after the other in this process, on one synthetic batch."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import torch
import transformers

from vitcrs.models import ModelFamily, family_of
from vitcrs.models.family import dropout_rate
from vitcrs.models.optim import AdamWInBackward
from vitcrs.units import GIB

from .analytic import (
    BlockShape,
    analytic_block_saved_bytes,
    ideal_model_saved_bytes,
    max_batch_from_estimate,
)
from .breakdown import PeakBreakdown, cpu_peak_breakdown
from .grid import BenchConfig
from .measure import (
    ModelSpec,
    architecture,
    block_shape,
    build,
    cuda_max_batch,
    free_memory,
    images_per_s,
    is_oom,
    make_step,
    model_saved_bytes,
    synthetic_batch,
    time_steps,
    unmodelled_block_parts,
)


@dataclass
class BenchOptions:
    batch_size: int = 64
    warmup: int = 3
    steps: int = 10
    seed: int = 0
    lr: float = 1e-4
    time_on_cpu: bool = False
    rounds: int = 1
    cpu_peak: bool = False
    find_max_batch: bool = False
    memory_budget_gib: float | None = None


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return f"{torch.cuda.get_device_name(device)} ({total / GIB:.1f} GiB)"
    cores = os.cpu_count()
    gpu = "" if torch.cuda.is_available() else ", no GPU"
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"CPU ({cores} cores{gpu})" + (f": {model}" if model else "")


@contextmanager
def _adamw(model: torch.nn.Module, lr: float, cfg: BenchConfig) -> Iterator[torch.optim.Optimizer]:
    """AdamW for the block (updating inside backward for the in-backward memory modes: `AdamWInBackward`,
    whose hooks are removed after it); the model's gradients are dropped after it."""
    adamw = AdamWInBackward if cfg.in_backward else torch.optim.AdamW
    opt = adamw(model.parameters(), lr=lr)
    try:
        yield opt
    finally:
        if isinstance(opt, AdamWInBackward):
            opt.remove_hooks()
        model.zero_grad(set_to_none=True)


def run_config(
    cfg: BenchConfig, spec: ModelSpec, opts: BenchOptions, device: torch.device, batch: tuple
) -> dict:
    """Measure one configuration; returns its row (ratios against the reference are filled in later)."""
    x, y = batch
    row: dict = {**cfg.to_dict(), "status": "ok", "reason": None}
    model = build(spec, cfg, device, opts.seed)
    arch = architecture(model)
    shape = block_shape(arch, opts.batch_size)
    row["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    timed = device.type == "cuda" or opts.time_on_cpu
    try:
        if timed:
            free_memory(device)  # also resets the CUDA peak statistics
            with _adamw(model, opts.lr, cfg) as opt:
                step = make_step(model, opt, x, y, cfg.precision)
                times = time_steps(step, opts.warmup, opts.steps, device)
            row["step_times_s"] = times
            row["images_per_s"] = images_per_s(opts.batch_size, times)
            if device.type == "cuda":
                row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
                row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
            del opt, step
            free_memory(device)
        if device.type == "cpu" and opts.cpu_peak:
            peak = _cpu_peak(model, cfg, opts, x, y)
            row["peak_allocated_bytes"] = peak.peak
            row["peak_breakdown"] = {part: getattr(peak, part) for part in PeakBreakdown.PARTS}
        row["saved_bytes"] = model_saved_bytes(model, x, y, cfg.precision)
        _analytic(row, cfg, shape)
        if opts.find_max_batch:
            _max_batch(row, cfg, spec, model, arch.image_size, shape, opts, device)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
        row["status"], row["reason"] = "oom", f"out of memory at batch {opts.batch_size}"
    finally:
        del model
        free_memory(device)
    return row


def _timing_round(
    cfg: BenchConfig, spec: ModelSpec, opts: BenchOptions, device: torch.device, batch: tuple
) -> list[float]:
    """One more round of `--warmup` + `--steps` timed steps of `cfg` on a fresh model (same seed)."""
    model = build(spec, cfg, device, opts.seed)
    try:
        with _adamw(model, opts.lr, cfg) as opt:
            return time_steps(make_step(model, opt, *batch, cfg.precision), opts.warmup, opts.steps, device)
    finally:
        del model
        free_memory(device)


def _cpu_peak(
    model: torch.nn.Module, cfg: BenchConfig, opts: BenchOptions, x: torch.Tensor, y: torch.Tensor
) -> PeakBreakdown:
    """Peak bytes of live tensors in one steady-state training step on the CPU, and where they go
    (`cpu_peak_breakdown`; its peak is `cpu_peak_bytes`').

    A first step on two images creates AdamW's state, as the warm-up steps do on a GPU; the measured step then
    starts with parameters, optimizer state and the batch alive, and no gradients (`set_to_none`).
    """
    with _adamw(model, opts.lr, cfg) as opt:
        make_step(model, opt, x[:2], y[:2], cfg.precision)()
        return cpu_peak_breakdown(model, opt, make_step(model, opt, x, y, cfg.precision), [x, y])


def _analytic(row: dict, cfg: BenchConfig, shape: BlockShape) -> None:
    row["block_exact_bytes"] = analytic_block_saved_bytes(shape, cfg.attn, cfg.autocast)
    row["block_bytes"] = analytic_block_saved_bytes(
        shape, cfg.attn, cfg.autocast, cfg.crs_config, cfg.target_names, cfg.checkpointing and cfg.modelled
    )


def _max_batch(
    row: dict,
    cfg: BenchConfig,
    spec: ModelSpec,
    model: torch.nn.Module,
    image_size: int,
    shape: BlockShape,
    opts: BenchOptions,
    device: torch.device,
) -> None:
    budget = int(opts.memory_budget_gib * GIB)
    labels = spec.num_labels
    if device.type == "cuda":

        def trial(b: int) -> None:
            xb, yb = synthetic_batch(b, image_size, labels, device, opts.seed)
            with _adamw(model, opts.lr, cfg) as opt:
                step = make_step(model, opt, xb, yb, cfg.precision)
                step()
                step()

        best = cuda_max_batch(trial, device, budget, opts.batch_size)
        row["max_batch"], row["max_batch_method"] = best, "cuda: largest batch whose steps ran within budget"
        if best > 0:
            xb, yb = synthetic_batch(best, image_size, labels, device, opts.seed)
            with _adamw(model, opts.lr, cfg) as opt:
                step = make_step(model, opt, xb, yb, cfg.precision)
                times = time_steps(step, opts.warmup, opts.steps, device)
            del opt, step, xb, yb
            row["max_batch_images_per_s"] = images_per_s(best, times)
        return

    # CPU: params + grads + AdamW's two states (fp32) + the measured saved bytes, linear in the batch (fitted
    # from batches 1 and 2), + with checkpointing one block's recomputed activations during backward.
    saved1, saved2 = (
        model_saved_bytes(model, *synthetic_batch(b, image_size, labels, device, opts.seed), cfg.precision)
        for b in (1, 2)
    )
    static = 4 * row["param_bytes"]
    crs = cfg.crs_config

    def estimate(b: int) -> int:
        est = static + saved1 + (b - 1) * (saved2 - saved1)
        if cfg.checkpointing:
            est += analytic_block_saved_bytes(
                shape.with_batch(b), cfg.attn, cfg.autocast, crs, cfg.target_names
            )
        return est

    row["max_batch"] = max_batch_from_estimate(estimate, budget)
    row["max_batch_method"] = "cpu estimate: 4 x params + saved-for-backward bytes (no workspace)"


def fill_ratios(rows: list[dict], configs: Sequence[BenchConfig]) -> None:
    """Ideal bytes and the reduction factors of each row against its reference exact row."""
    by_name = {r["name"]: r for r in rows}
    for cfg, row in zip(configs, rows, strict=True):
        if row["status"] != "ok":
            continue
        ref = by_name.get(cfg.reference.name)
        ok_ref = ref is not None and ref["status"] == "ok"
        row["reference"] = cfg.reference.name if ok_ref else None
        saved = row["saved_bytes"]
        if cfg.modelled:
            row["block_ideal_reduction"] = row["block_exact_bytes"] / row["block_bytes"]
        if not ok_ref:
            continue
        row["saved_reduction"] = ref["saved_bytes"] / saved
        if cfg.modelled:
            shape = BlockShape(**row["block_shape"])
            ideal = ideal_model_saved_bytes(
                ref["saved_bytes"],
                shape,
                cfg.attn,
                cfg.autocast,
                cfg.crs_config,
                cfg.target_names,
                cfg.checkpointing,
            )
            row["ideal_saved_bytes"] = ideal
            row["ideal_reduction"] = ref["saved_bytes"] / ideal
            row["realised_over_ideal"] = ideal / saved  # = saved_reduction / ideal_reduction
        for key, out in (
            ("peak_allocated_bytes", "peak_allocated_reduction"),
            ("peak_reserved_bytes", "peak_reserved_reduction"),
        ):
            if row.get(key) and ref.get(key):
                row[out] = ref[key] / row[key]
        if row.get("images_per_s") and ref.get("images_per_s"):
            row["throughput_ratio"] = row["images_per_s"] / ref["images_per_s"]


def run_bench(
    configs: Sequence[BenchConfig],
    spec: ModelSpec,
    opts: BenchOptions,
    device: torch.device,
    argv: Sequence[str] = (),
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> dict:
    """Run every configuration (skipping invalid ones with their reason); returns {"meta", "rows"}."""
    probe = spec.build("eager")
    arch, family = architecture(probe), family_of(probe)
    shape = block_shape(arch, opts.batch_size)
    params = sum(p.numel() for p in probe.parameters())
    dropout, extras = dropout_rate(probe), unmodelled_block_parts(probe)
    del probe
    batch = synthetic_batch(opts.batch_size, arch.image_size, spec.num_labels, device, opts.seed)
    rows = []
    for i, cfg in enumerate(configs, 1):
        reason = cfg.skip_reason() or spec_skip_reason(family, cfg)
        if reason:
            row = {**cfg.to_dict(), "status": "skipped", "reason": reason}
        else:
            try:
                row = run_config(cfg, spec, opts, device, batch)
            except Exception as exc:  # one broken configuration must not lose the others' results
                traceback.print_exc()
                row = {**cfg.to_dict(), "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
                free_memory(device)
            row["block_shape"] = shape.to_dict()
        rows.append(row)
        log(f"[{i}/{len(configs)}] {cfg.name}: {_summary(row)}")
    timed = device.type == "cuda" or opts.time_on_cpu
    for r in range(2, opts.rounds + 1 if timed else 1):
        for cfg, row in zip(configs, rows, strict=True):
            if row["status"] == "ok" and row.get("step_times_s"):
                row["step_times_s"] += _timing_round(cfg, spec, opts, device, batch)
                row["images_per_s"] = images_per_s(opts.batch_size, row["step_times_s"])
        log(f"timing round {r}/{opts.rounds} done")
    fill_ratios(rows, configs)
    meta = {
        "command": shlex.join(["python", "-m", "vitcrs.bench", *argv]),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_description(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model": {
            **spec.to_dict(),
            "family": family.name,
            "weights": spec.weights,
            "hidden": arch.hidden_size,
            "layers": arch.num_hidden_layers,
            "heads": arch.num_attention_heads,
            "intermediate": arch.intermediate_size,
            "image_size": arch.image_size,
            "patch_size": arch.patch_size,
            "prefix_tokens": arch.prefix_tokens,
            "tokens": shape.tokens,
            "parameters": params,
            "dropout": dropout,
            "unmodelled": extras,
        },
        "batch_size": opts.batch_size,
        "warmup": opts.warmup,
        "steps": opts.steps,
        "seed": opts.seed,
        "timed": timed,
        "rounds": opts.rounds if timed else None,
        "peak": "cuda" if device.type == "cuda" else "cpu" if opts.cpu_peak else None,
        "find_max_batch": opts.find_max_batch,
        "memory_budget_gib": opts.memory_budget_gib,
    }
    return {"meta": meta, "rows": rows}


def spec_skip_reason(family: ModelFamily, cfg: BenchConfig) -> str | None:
    """Why the model's family cannot run `cfg` in the bench, or None."""
    if cfg.checkpointing and not family.name.startswith("hf_"):
        return (
            f"gradient checkpointing is measured on Hugging Face models only: {family.title} models "
            "checkpoint their blocks inside their own forward (timm's set_grad_checkpointing), where the "
            "bench cannot count the block inputs checkpointing keeps"
        )
    return None


def _summary(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']} ({row['reason']})"
    parts = [f"saved {row['saved_bytes'] / GIB:.3f} GiB"]
    if row.get("images_per_s"):
        parts.append(f"{row['images_per_s']:.1f} img/s")
    if row.get("peak_allocated_bytes"):
        parts.append(f"peak {row['peak_allocated_bytes'] / GIB:.2f} GiB")
    if row.get("max_batch") is not None:
        parts.append(f"max batch {row['max_batch']}")
    return ", ".join(parts)
