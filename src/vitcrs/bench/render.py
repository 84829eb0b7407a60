"""The benchmark's Markdown report (bench.md): header with device, versions and command, then the table."""

from __future__ import annotations

from vitcrs.units import GIB, MIB


def _unit(rows: list[dict]) -> tuple[str, int]:
    biggest = max((r.get("saved_bytes") or 0 for r in rows), default=0)
    return ("GiB", GIB) if biggest >= GIB else ("MiB", MIB)


def _bytes(v: int | None, scale: int) -> str:
    return "n/a" if v is None else f"{v / scale:,.3f}" if scale == GIB else f"{v / scale:,.2f}"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _num(v: float | None, fmt: str = "{:,.1f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    ok = [r for r in rows if r["status"] != "skipped"]
    unit, scale = _unit(ok)
    m = meta["model"]
    model = m["path"] or m["name"]
    lines = [
        f"# vitcrs.bench: {model}, batch {meta['batch_size']}",
        "",
        f"- command: `{meta['command']}`",
        f"- device: {meta['device']}",
        f"- torch {meta['torch']}, transformers {meta['transformers']}, python {meta['python']}",
        f"- date: {meta['date']}",
        f"- model: {m.get('family', 'hf_vit')}, hidden {m['hidden']}, {m['layers']} layers, {m['heads']} "
        f"heads, mlp {m['intermediate']}, {m['image_size']} px / patch {m['patch_size']} = {m['tokens']} "
        f"tokens, {m['parameters']:,} parameters, "
        f"{'checkpoint weights' if m.get('weights', m['path']) else 'random init'}; AdamW; one synthetic "
        "batch",
        "",
        *_notes(meta),
        "",
    ]
    max_batch = meta["find_max_batch"]
    header = [
        "attn",
        "precision",
        "ckpt",
        "memory",
        "method",
        "ratio",
        "targets",
        f"saved {unit}",
        f"ideal saved {unit}",
        "saved red.",
        "ideal red.",
        "realised/ideal",
        "block ideal red.",
        "peak alloc GiB",
        "peak reserved GiB",
        "peak red.",
        "images/s",
        "throughput vs exact",
    ]
    if max_batch:
        header += [f"max batch @ {meta['memory_budget_gib']:g} GiB", "images/s @ max batch"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in ok:
        if r["status"] != "ok":
            cells = [r["attn"], r["precision"], "yes" if r["checkpointing"] else "no", _memory(r)]
            cells += [r["method"], f"{r['ratio']:g}", r["targets"], f"{r['status']}: {r['reason']}"]
            cells += [""] * (len(header) - len(cells))
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells = [
            r["attn"],
            r["precision"],
            "yes" if r["checkpointing"] else "no",
            _memory(r),
            r["method"],
            f"{r['ratio']:g}",
            r["targets"],
            _bytes(r.get("saved_bytes"), scale),
            _bytes(r.get("ideal_saved_bytes"), scale),
            _x(r.get("saved_reduction")),
            _x(r.get("ideal_reduction")),
            _num(r.get("realised_over_ideal"), "{:.3f}"),
            _x(r.get("block_ideal_reduction")),
            _bytes(r.get("peak_allocated_bytes"), GIB),
            _bytes(r.get("peak_reserved_bytes"), GIB),
            _x(r.get("peak_allocated_reduction")),
            _num(r.get("images_per_s")),
            _x(r.get("throughput_ratio")),
        ]
        if max_batch:
            cells += [_num(r.get("max_batch"), "{:d}"), _num(r.get("max_batch_images_per_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _breakdown([r for r in ok if r.get("peak_breakdown")])
    skipped = [r for r in rows if r["status"] == "skipped"]
    if skipped:
        lines += ["", f"Skipped ({len(skipped)}):", ""]
        lines += [f"- {r['name']}: {r['reason']}" for r in skipped]
    return "\n".join(lines) + "\n"


def _memory(row: dict) -> str:
    return row.get("memory", "default")


BREAKDOWN = {
    "weights": "weights",
    "optimizer_state": "optimizer state",
    "batch": "batch",
    "gradients": "gradients",
    "kept_activations": "kept activations",
    "transient": "transient workspace",
}


def _breakdown(rows: list[dict]) -> list[str]:
    """The peak of each row split into its parts at the moment of the peak (`vitcrs.bench.breakdown`)."""
    if not rows:
        return []
    header = ["attn", "precision", "ckpt", "memory", "method", "ratio", "targets", "peak GiB"]
    header += [f"{name} GiB" for name in BREAKDOWN.values()]
    lines = [
        "",
        "Where the peak goes (GiB at the moment of the peak; the parts sum to the peak): weights, AdamW's "
        "two moments, the batch; the gradients alive then; the bytes saved for backward still alive then "
        "(kept activations); the rest, the transient workspace (recomputations in backward, the temporaries "
        "of the op running at the peak, the loss).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for r in rows:
        parts = r["peak_breakdown"]
        cells = [r["attn"], r["precision"], "yes" if r["checkpointing"] else "no", _memory(r), r["method"]]
        cells += [f"{r['ratio']:g}", r["targets"], _bytes(r["peak_allocated_bytes"], GIB)]
        cells += [_bytes(parts[key], GIB) for key in BREAKDOWN]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _notes(meta: dict) -> list[str]:
    notes = [
        "- saved: bytes of the distinct storages one training forward (model + loss) keeps for backward, "
        "parameters excluded (`SavedTensorsMeter`). With checkpointing: what stays between forward and "
        "backward (each block's input and what the ops outside the blocks save); during backward one block's "
        "activations are recomputed on top of it. No ideal is given for checkpointed rows.",
        "- ideal saved: the exact row's measured bytes minus, for each block, what the analytic block model "
        "says sampling saves (eager: `vitcrs.crs.vit_block_saved_bytes`; sdpa: its extension in "
        "`vitcrs.bench.analytic`). block ideal red.: analytic exact block / analytic sampled block.",
        "- red. (reduction) and throughput ratios are against the exact row of the same attention and "
        "precision without checkpointing; realised/ideal = saved red. / ideal red.",
    ]
    if meta["device_type"] != "cuda":
        rounds = meta.get("rounds") or 1
        timed = (
            f"images/s measured on CPU (--time-on-cpu): batch / median of {meta['steps']} timed steps after "
            f"{meta['warmup']} warm-up steps, in {rounds} round(s) over all configurations; not a GPU figure"
            if meta["timed"]
            else "images/s"
        )
        peak = (
            "peak alloc: the most bytes of live CPU tensors during one steady-state training step (the torch "
            "profiler's allocation events; parameters, AdamW state and the batch included; no allocator "
            "rounding, workspace or fragmentation), the CPU counterpart of the CUDA figure; peak reserved n/a"
            if meta.get("peak") == "cpu"
            else "peak memory is n/a (CUDA allocator statistics, or --cpu-peak)"
        )
        notes.append(
            f"- CPU run: {peak}"
            + ("; " + timed if meta["timed"] else f"; {timed} n/a (not timed on CPU)")
            + "."
        )
    else:
        notes.append(
            f"- images/s: batch / median of {meta['steps']} timed steps (CUDA events) after {meta['warmup']} "
            "warm-up steps; peak: `torch.cuda.max_memory_allocated/reserved` over those steps."
        )
    if meta["find_max_batch"]:
        if meta["device_type"] == "cuda":
            notes.append(
                "- max batch: the allocator capped at the budget, the largest batch whose two training steps "
                "ran without OOM (doubling, then bisection); images/s timed at that batch."
            )
        else:
            notes.append(
                "- max batch (CPU estimate, not a measurement): 4 x parameter bytes (weights, grads, "
                "AdamW states) + saved-for-backward bytes, linear in the batch (measured at batches 1 and "
                "2), + one block's analytic bytes with checkpointing; ignores workspace and fragmentation, "
                "so it is an upper bound."
            )
    if meta["model"].get("unmodelled"):
        notes.append(
            f"- the model's blocks have {' and '.join(meta['model']['unmodelled'])}, which the analytic "
            "block model (a plain ViT block) leaves out: ideal figures do not count what they keep, so "
            "realised/ideal differs from 1."
        )
    if meta["model"]["dropout"]:
        notes.append(
            f"- the model has dropout {meta['model']['dropout']:g}; the analytic block model assumes none, "
            "so ideal figures omit the dropout masks."
        )
    return notes
