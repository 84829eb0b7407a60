"""What a GPU check leaves behind: summary.md from summary.json, the combined bench table, the bundle."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

from vitcrs.files import replacing, write_text_atomic
from vitcrs.record import METRICS_FILE, RunRecord
from vitcrs.tables import markdown_table

BUNDLE_SKIP = (".ckpt", ".pt", ".safetensors")  # model weights and caches: large, and not results


def train_records(out: Path) -> list[tuple[str, RunRecord | None]]:
    """(run dir name, its metrics.json record; None when unreadable) per training run dir under out/train."""
    return [
        (path.parent.name, RunRecord.read(path)) for path in sorted((out / "train").glob(f"*/{METRICS_FILE}"))
    ]


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def write_summary(out: Path, data: dict) -> None:
    """out/summary.md: the steps table, then the training runs (from their metrics.json)."""
    meta = data["meta"]
    lines = [
        f"# vitcrs GPU check: {meta.get('device', '?')}",
        "",
        f"- command: `{meta['command']}` ({meta['mode']} mode)",
        f"- started {meta['started']}, {meta.get('elapsed_s', 0):.0f} s of a {meta['budget_s']:.0f} s budget",
        "",
    ]
    steps = [_step_row(s) for s in data["steps"]]
    lines += markdown_table(["step", "status", "seconds", "limit", "result"], steps)
    records = train_records(out)
    if records:
        header = ["run", "status", "ratio", "targets", "test acc", "images/s", "peak GiB", "wall s"]
        runs = [_run_row(run, m) for run, m in records]
        lines += ["", "Training runs (`train/<run>/metrics.json`):", "", *markdown_table(header, runs)]
    lines += ["", "Logs: `gpu_check.log` (this check), `logs/<step>.log` (each command's output).", ""]
    write_text_atomic(out / "summary.md", "\n".join(lines))


def _step_row(step: dict) -> list[str]:
    result = step["note"].replace("|", "/")
    where = ", ".join(f"`{o}`" for o in step["outputs"])
    result = f"{result}{'; ' if result and where else ''}{where}"
    title = f"{step['name']}: {step['title']}"
    return [title, f"**{step['status']}**", f"{step['seconds']:.0f}", f"{step['limit_s']:.0f}", result]


def _run_row(run: str, m: RunRecord | None) -> list[str]:
    if m is None:
        return [run, "unreadable", "", "", "n/a", "n/a", "n/a", "n/a"]
    targets = ",".join(m.targets or []) or "-"
    return [
        run, str(m.status), str(m.ratio), targets, _fmt(m.test_acc, ".4f"), _fmt(m.images_per_s, ".0f"),
        _fmt(m.peak_mem_allocated_gib, ".2f"), _fmt(m.wall_time_s, ".0f"),
    ]  # fmt: skip


def write_summary_json(out: Path, data: dict) -> None:
    """out/summary.json: the check's meta and step records, as data."""
    write_text_atomic(out / "summary.json", json.dumps(data, indent=2) + "\n")


def combine_bench(bench: Path, folders: list[Path]) -> None:
    """bench/bench.md: the bench.md of every finished bench run, one section each, in order."""
    parts = [
        f"## {folder.name}\n\n"
        + "\n".join(_demote(line) for line in (folder / "bench.md").read_text().splitlines())
        for folder in folders
        if (folder / "bench.md").is_file()
    ]
    if parts:
        write_text_atomic(bench / "bench.md", "# Bench rows of the GPU check\n\n" + "\n".join(parts))


def _demote(line: str) -> str:
    """A markdown heading one level down (a bench.md's title under its section)."""
    return "##" + line if line.startswith("# ") else line


def write_bundle(out: Path, bundle: Path) -> None:
    """bundle/gpu_check.tar.gz (everything under out but weights), summary.md and gpu_check.log, each replaced
    atomically, so a check stopped at any moment leaves the last finished step's state there."""
    with replacing(bundle / "gpu_check.tar.gz") as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=out.name, filter=lambda t: None if t.name.endswith(BUNDLE_SKIP) else t)
    for name in ("summary.md", "gpu_check.log"):
        if (out / name).is_file() and out.resolve() != bundle.resolve():
            with replacing(bundle / name) as tmp:
                shutil.copyfile(out / name, tmp)
