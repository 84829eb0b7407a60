"""What a GPU check leaves behind: summary.md from summary.json, the combined bench table, the bundle."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

BUNDLE_SKIP = (".ckpt", ".pt", ".safetensors")  # model weights and caches: large, and not results


def train_rows(out: Path) -> list[dict]:
    """One row per training run dir under out/train: its metrics.json's headline figures."""
    rows = []
    for path in sorted((out / "train").glob("*/metrics.json")):
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError):
            rows.append({"run": path.parent.name, "status": "unreadable"})
            continue
        rows.append(
            {
                "run": path.parent.name,
                "status": m.get("status"),
                "ratio": m.get("ratio"),
                "targets": ",".join(m.get("targets") or []) or "-",
                "test_acc": m.get("test_acc"),
                "images_per_s": m.get("images_per_s"),
                "peak_gib": m.get("peak_mem_allocated_gib"),
                "wall_s": m.get("wall_time_s"),
            }
        )
    return rows


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
    rows = train_rows(out)
    if rows:
        lines += [
            "",
            "Training runs (`train/<run>/metrics.json`):",
            "",
            "| run | status | ratio | targets | test acc | images/s | peak GiB | wall s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            lines.append(
                f"| {r['run']} | {r['status']} | {r.get('ratio', '')} | {r.get('targets', '')} | "
                f"{_fmt(r.get('test_acc'), '.4f')} | {_fmt(r.get('images_per_s'), '.0f')} | "
                f"{_fmt(r.get('peak_gib'), '.2f')} | {_fmt(r.get('wall_s'), '.0f')} |"
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
