"""What a GPU check leaves behind: summary.md from summary.json, the combined bench table, the bundle."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

from vitcrs.record import METRICS_FILE, RunRecord

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
        "| step | status | seconds | limit | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in data["steps"]:
        result = s["note"].replace("|", "/")
        where = ", ".join(f"`{o}`" for o in s["outputs"])
        lines.append(
            f"| {s['name']}: {s['title']} | **{s['status']}** | {s['seconds']:.0f} | "
            f"{s['limit_s']:.0f} | {result}{'; ' if result and where else ''}{where} |"
        )
    records = train_records(out)
    if records:
        lines += [
            "",
            "Training runs (`train/<run>/metrics.json`):",
            "",
            "| run | status | ratio | targets | test acc | images/s | peak GiB | wall s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for run, m in records:
            if m is None:
                lines.append(f"| {run} | unreadable |  |  | n/a | n/a | n/a | n/a |")
                continue
            lines.append(
                f"| {run} | {m.status} | {m.ratio} | {','.join(m.targets or []) or '-'} | "
                f"{_fmt(m.test_acc, '.4f')} | {_fmt(m.images_per_s, '.0f')} | "
                f"{_fmt(m.peak_mem_allocated_gib, '.2f')} | {_fmt(m.wall_time_s, '.0f')} |"
            )
    lines += ["", "Logs: `gpu_check.log` (this check), `logs/<step>.log` (each command's output).", ""]
    _atomic_write(out / "summary.md", "\n".join(lines))


def combine_bench(bench: Path, folders: list[Path]) -> None:
    """bench/bench.md: the bench.md of every finished bench run, one section each, in order."""
    parts = [
        f"## {folder.name}\n\n"
        + "\n".join(_demote(line) for line in (folder / "bench.md").read_text().splitlines())
        for folder in folders
        if (folder / "bench.md").is_file()
    ]
    if parts:
        _atomic_write(bench / "bench.md", "# Bench rows of the GPU check\n\n" + "\n".join(parts))


def _demote(line: str) -> str:
    """A markdown heading one level down (a bench.md's title under its section)."""
    return "##" + line if line.startswith("# ") else line


def write_bundle(out: Path, bundle: Path) -> None:
    """bundle/gpu_check.tar.gz (everything under out but weights), summary.md and gpu_check.log, each replaced
    atomically, so a check stopped at any moment leaves the last finished step's state there."""
    bundle.mkdir(parents=True, exist_ok=True)
    tmp = bundle / ".gpu_check.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=out.name, filter=lambda t: None if t.name.endswith(BUNDLE_SKIP) else t)
    os.replace(tmp, bundle / "gpu_check.tar.gz")
    for name in ("summary.md", "gpu_check.log"):
        if (out / name).is_file() and out.resolve() != bundle.resolve():
            shutil.copyfile(out / name, bundle / f".{name}.tmp")
            os.replace(bundle / f".{name}.tmp", bundle / name)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
