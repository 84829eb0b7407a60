"""`python -m vitcrs.report RUN_OR_MULTIRUN_DIR… [--out DIR]`: tables and plots of the study's runs.
`python -m vitcrs.report --schema`: README's metrics.json table (from the field docs of `vitcrs.record`).

Reads every metrics.json under the given paths (searched recursively) and writes into one folder
(default: reports/<timestamp> under the current directory): accuracy.md/.tex, memory.md/.tex, three PNG
plots, results.json and index.md. Prints that folder's path, and nothing else, on stdout. Exits 1 when no
run is complete (the report, listing them, is written all the same), 2 when there is nothing to read.

Runs are grouped by their settings (minus the swept keys dataset, label_type, ratio, seed; plus device and
versions), one table section per group, so that runs that differ in anything else are never mixed in a
cell. The one exception is the exact baseline: a group without a ratio-1 run in a column borrows (and
marks as shared) that of a group differing only in method, targets and prob, whose exact run computes the
same thing; never with the "mlp" target (see vitcrs.report.data). Bad files never stop the report: they are
listed as unreadable or invalid.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from vitcrs.errors import ConfigError
from vitcrs.record import schema_table
from vitcrs.report.data import Group, Problem, Run, find_metrics, group_runs, read_run
from vitcrs.report.render import (
    accuracy_markdown,
    accuracy_tex,
    index_markdown,
    memory_markdown,
    memory_tex,
    results_data,
)

__all__ = ["build_report", "main"]

TEXT_FILES = {
    "accuracy.md": "test accuracy (%) per sampling ratio and dataset, change vs exact in points",
    "accuracy.tex": "the same accuracy tables in LaTeX (booktabs)",
    "memory.md": "peak memory (or saved bytes on CPU) with reduction factor vs exact, images/s, gradient "
    "fidelity when measured",
    "memory.tex": "the same memory tables in LaTeX (booktabs)",
    "results.json": "the aggregated cells of every group, failed runs and unreadable files, as data",
}


def new_report_dir(base: Path, now: datetime) -> Path:
    """Create and return base/<YYYY-MM-DD_HH-MM-SS>, with a _2, _3, … suffix if that already exists."""
    stamp = now.strftime("%Y-%m-%d_%H-%M-%S")
    for n in range(1, 1000):
        path = base / (stamp if n == 1 else f"{stamp}_{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"--out: could not create a new folder under {base}; pass --out DIR")


def collect(paths: Sequence[Path]) -> tuple[dict[str, int], list[Run], list[Problem]]:
    """Metrics files per input path, and the runs and problems read from them (each file once).

    Raises ConfigError if a path does not exist or no metrics.json is found at all."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ConfigError(
            f"paths: {', '.join(missing)} not found; pass run dirs, multirun dirs or a parent of them"
        )
    inputs, files = {}, {}
    for path in paths:
        found = find_metrics(path)
        inputs[str(path)] = len(found)
        files.update({f.resolve(): f for f in found if f.resolve() not in files})
    if not files:
        raise ConfigError(f"paths: no metrics.json under {', '.join(map(str, paths))}; is a run finished?")
    results = [read_run(f) for f in files.values()]
    return inputs, [r for r in results if isinstance(r, Run)], [r for r in results if isinstance(r, Problem)]


def build_report(paths: Sequence[Path], out: Path | None = None, command: str | None = None) -> Path:
    """Write the report of every metrics.json under `paths` into `out` (created if needed; default a new
    reports/<timestamp> under the current directory) and return that folder. `command` is recorded in
    index.md. Each metrics.json that cannot be read, or lacks what a run needs, is named on stderr with
    the reason. Raises ConfigError for a missing path, an `out` that is a file, or no metrics.json at all."""
    return _build(paths, out, command)[0]


def _build(
    paths: Sequence[Path], out: Path | None, command: str | None
) -> tuple[Path, list[Run], list[Problem]]:
    """`build_report`, returning the runs and problems read as well."""
    from vitcrs.report.plots import PLOT_FILES, write_plots  # matplotlib is imported only when plotting

    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError(f"--out={str(out)!r} is a file: give a folder (created if missing) for the report.")
    inputs, runs, problems = collect(paths)
    for problem in problems:  # also listed in the report; said here so that no file is left out unseen
        print(f"skipped {problem.path}: {problem.reason}", file=sys.stderr)
    groups: list[Group] = group_runs(runs)
    now = datetime.now()
    if out is None:
        out = new_report_dir(Path.cwd() / "reports", now)
    out.mkdir(parents=True, exist_ok=True)
    texts = {
        "accuracy.md": accuracy_markdown(groups, problems),
        "accuracy.tex": accuracy_tex(groups),
        "memory.md": memory_markdown(groups, problems),
        "memory.tex": memory_tex(groups),
        "results.json": json.dumps(results_data(groups, problems), indent=2, default=str) + "\n",
    }
    for name, text in texts.items():
        (out / name).write_text(text, encoding="utf-8")
    write_plots(groups, out)
    command = command or "python -m vitcrs.report " + shlex.join(map(str, paths))
    index = index_markdown(
        {**TEXT_FILES, **PLOT_FILES},
        inputs,
        runs,
        groups,
        problems,
        command,
        str(Path.cwd()),
        now.isoformat(timespec="seconds"),
    )
    (out / "index.md").write_text(index, encoding="utf-8")
    return out, runs, problems


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status: 0 when the report has a complete run, 1 when it was written
    but has none (only failed, incomplete or unreadable runs: nothing measured to report), 2 for bad
    arguments or no metrics.json at all."""
    parser = argparse.ArgumentParser(
        prog="python -m vitcrs.report",
        description="Accuracy and memory tables and plots from vitcrs runs' metrics.json files.",
    )
    parser.add_argument("paths", nargs="*", type=Path, help="run dirs, multirun dirs, or any parent of them")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: reports/<timestamp>)")
    parser.add_argument(
        "--schema", action="store_true", help="print the metrics.json keys and their meaning (README's table)"
    )
    args = parser.parse_args(argv)
    if args.schema:
        print(schema_table(), end="")
        return 0
    if not args.paths:
        parser.error("the following arguments are required: paths")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        out, runs, problems = _build(args.paths, args.out, "python -m vitcrs.report " + shlex.join(argv))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    if not any(r.status == "complete" and r.test_acc is not None for r in runs):
        counts = Counter(r.status for r in runs)
        found = [f"{n} {status}" for status, n in sorted(counts.items())]
        found += [f"{len(problems)} unreadable or invalid"] if problems else []
        print(
            f"error: no usable run: none of the {len(runs) + len(problems)} metrics.json is a complete run "
            f"with a test accuracy ({', '.join(found)}); the report in {out} lists them.",
            file=sys.stderr,
        )
        return 1
    return 0
