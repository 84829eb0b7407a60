"""Render groups of runs as Markdown and LaTeX tables, results.json data and the index.

Every text function returns a string; nothing here writes files. Markdown uses Unicode (−, ±, —),
LaTeX uses math mode ($-$, $\\pm$) and "--" for missing cells and needs booktabs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vitcrs.record import KEY
from vitcrs.report.data import (
    EXACT_RATIO,
    LEAN_TARGET,
    Cell,
    Column,
    Group,
    Problem,
    Run,
    Stat,
    differing_keys,
    lean,
)
from vitcrs.tables import latex_table, markdown_table
from vitcrs.units import GIB, MIB


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


_TEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {
    "\\": r"\textbackslash{}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(c, c) for c in text)


@dataclass(frozen=True)
class Style:
    """The symbols and escaping of one output format."""

    minus: str
    pm: str
    dash: str
    escape: Callable[[str], str]


MD = Style(minus="−", pm="±", dash="—", escape=_md_escape)
TEX = Style(minus="$-$", pm="$\\pm$", dash="--", escape=_tex_escape)


def ratio_label(ratio: float, shared: bool = False) -> str:
    """Row label: "1 (exact)" for ratio 1 ("1 (exact, shared)" when `shared`: borrowed from another
    group), else the ratio as written ("0.5")."""
    if ratio != EXACT_RATIO:
        return f"{ratio:g}"
    return "1 (exact, shared)" if shared else "1 (exact)"


def signed(value: float, style: Style) -> str:
    """Points with an explicit sign and 2 decimals: "+0.12", "−1.41", "±0.00" when it rounds to zero."""
    rounded = round(value, 2)
    if rounded == 0:
        return f"{style.pm}0.00"
    return f"{'+' if rounded > 0 else style.minus}{abs(rounded):.2f}"


def value_text(value: str, value_std: str | None, note: str | None, style: Style) -> str:
    """A value, or value ± std, optionally followed by " (note)": "97.60 ± 0.12 (−1.41)"."""
    text = value if value_std is None else f"{value} {style.pm} {value_std}"
    return text if note is None else f"{text} ({note})"


def status_text(cell: Cell, with_value: bool, style: Style) -> str:
    """What the cell's runs without a result are: "failed", "incomplete", "2 failed, 1 incomplete".
    A lone status word when it is the cell's only run and there is no value; counts otherwise. Escaped for
    `style` ("no test_acc" needs it in LaTeX)."""
    counts = cell.status_counts()
    if not with_value and len(cell.runs) == 1 and counts:
        return style.escape(next(iter(counts)))
    return style.escape(", ".join(f"{n} {what}" for what, n in counts.items()))


def _with_status(text: str, cell: Cell, style: Style) -> str:
    extra = status_text(cell, with_value=True, style=style)
    return f"{text}; {extra}" if extra else text


def accuracy_cell(group: Group, cell: Cell, style: Style, show_n: bool) -> str:
    """Test accuracy in % (2 decimals), "± std" with several seeds, the change vs ratio 1 in points,
    ", n=k" when `show_n`, then any failed/incomplete runs; the dash when the cell has no run."""
    if not cell.runs:
        return style.dash
    acc = cell.stat(KEY.test_acc)
    if acc is None:
        return status_text(cell, with_value=False, style=style)
    drop = group.drop_pts(cell)
    text = value_text(
        f"{100 * acc.mean:.2f}",
        None if acc.std is None else f"{100 * acc.std:.2f}",
        None if drop is None else signed(drop, style),
        style,
    )
    if show_n:
        text += f", n={acc.n}"
    return _with_status(text, cell, style)


def format_gib(value: float) -> str:
    """GiB with 2 decimals: "5.12 GiB"."""
    return f"{value:.2f} GiB"


def format_bytes(value: float) -> str:
    """Bytes as "512.00 MiB", or "1.50 GiB" from 1 GiB on."""
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / MIB:.2f} MiB"


def memory_cell(
    group: Group, cell: Cell, attr: str, fmt: Callable[[float], str], style: Style, factor: bool = True
) -> str:
    """Mean of `attr` formatted by `fmt`, with the reduction factor vs ratio 1 if `factor` ("4.00 GiB
    (2.00x)"); the dash for no run, the status for no complete run, "n/a" when complete runs lack it."""
    if not cell.runs:
        return style.dash
    if not cell.complete:
        return status_text(cell, with_value=False, style=style)
    value = cell.stat(attr)
    if value is None:
        return "n/a"
    ratio = group.reduction(cell, attr) if factor else None
    return fmt(value.mean) if ratio is None else f"{fmt(value.mean)} ({ratio:.2f}x)"


def config_value(value: Any) -> str:
    """A settings value as text: lists comma-joined, None as null, booleans lower-case."""
    if isinstance(value, list | tuple):
        return ",".join(config_value(v) for v in value)
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def config_items(config: dict[str, Any], keys: Sequence[str] | None = None) -> list[str]:
    """The `key=value` strings of `keys` (default: all keys of `config`)."""
    return [f"{k}={config_value(config.get(k, '(unset)'))}" for k in (config if keys is None else keys)]


def group_title(group: Group, groups: Sequence[Group]) -> str:
    """Section title: "Group 1", plus the settings that set it apart when there are several groups."""
    if len(groups) < 2:
        return f"Group {group.index}"
    differs = config_items(group.config, differing_keys(groups))
    return f"Group {group.index} of {len(groups)}: " + ", ".join(differs)


def run_label(run: Run) -> str:
    """Short name of a run: "CIFAR-10, ratio 0.5, seed 0"."""
    seed = "?" if run.seed is None else str(run.seed)
    return f"{Column(run.dataset, run.label_type).label}, ratio {run.ratio:g}, seed {seed}"


def one_line(text: str, limit: int = 300) -> str:
    """Whitespace collapsed, cut to `limit` characters."""
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def unfinished_runs(group: Group) -> list[Run]:
    """The group's runs without a usable result: failed, incomplete, or complete without test_acc."""
    return [r for r in group.runs if r.status != "complete" or r.test_acc is None]


def accuracy_counts(group: Group) -> set[int]:
    """The distinct numbers of test accuracies averaged in the group's table cells (borrowed exact ones
    included)."""
    return {
        s.n
        for c in group.columns
        for r in group.table_ratios
        if (s := group.table_cell(c, r).stat(KEY.test_acc))
    }


def accuracy_rows(group: Group, style: Style) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a group's accuracy table: rows are ratios (exact first), columns datasets. The
    exact row is labelled shared when any of its cells is borrowed (`shared_lines` says which)."""
    columns = group.columns
    show_n = len(accuracy_counts(group)) > 1
    header = ["Ratio", *(style.escape(c.label) for c in columns)]
    rows = [
        [
            style.escape(ratio_label(r, r == EXACT_RATIO and bool(group.shared))),
            *(accuracy_cell(group, group.table_cell(c, r), style, show_n) for c in columns),
        ]
        for r in group.table_ratios
    ]
    return header, rows


MEMORY_FIELDS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    (KEY.peak_mem_allocated_gib, "Peak allocated", format_gib),
    (KEY.peak_mem_reserved_gib, "Peak reserved", format_gib),
    (KEY.saved_bytes_per_step, "Saved for backward / step", format_bytes),
)


def memory_fields(group: Group) -> list[tuple[str, str, Callable[[float], str]]]:
    """The memory columns of a group: both GPU peaks if any run has one (or if no run reports any memory),
    and saved bytes if any run reports them."""
    gpu, saved = list(MEMORY_FIELDS[:2]), MEMORY_FIELDS[2]
    has_gpu = any(
        r.peak_mem_allocated_gib is not None or r.peak_mem_reserved_gib is not None for r in group.runs
    )
    has_saved = any(r.saved_bytes_per_step is not None for r in group.runs)
    return [*(gpu if has_gpu or not has_saved else []), *([saved] if has_saved else [])]


FIDELITY_FIELDS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    (KEY.fidelity_rel_err, "Grad. rel. error", lambda v: f"{v:.3g}"),
    (KEY.fidelity_cos, "Grad. cos", lambda v: f"{v:.3f}"),
)


def fidelity_fields(group: Group) -> list[tuple[str, str, Callable[[float], str]]]:
    """The gradient-fidelity columns of a group: both if any run measured them (callbacks.grad_fidelity)."""
    measured = any(r.fidelity_rel_err is not None or r.fidelity_cos is not None for r in group.runs)
    return list(FIDELITY_FIELDS) if measured else []


def memory_rows(group: Group, style: Style) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a group's memory table: one row per (dataset, ratio); gradient-fidelity columns
    after images/s when the group's runs measured it."""
    fields, fidelity = memory_fields(group), fidelity_fields(group)
    header = ["Dataset", "Ratio", *(name for _, name, _ in fields), "Images/s"]
    header += [name for _, name, _ in fidelity]
    rows = []
    for column in group.columns:
        for ratio in group.table_ratios:
            cell = group.table_cell(column, ratio)
            mems = [memory_cell(group, cell, attr, fmt, style) for attr, _, fmt in fields]
            ips = memory_cell(group, cell, KEY.images_per_s, lambda v: f"{v:.1f}", style, factor=False)
            fid = [memory_cell(group, cell, attr, fmt, style, factor=False) for attr, _, fmt in fidelity]
            label = ratio_label(ratio, ratio == EXACT_RATIO and column in group.shared)
            rows.append([style.escape(column.label), style.escape(label), *mems, ips, *fid])
    return header, rows


def shared_lines(group: Group) -> list[str]:
    """Notes on the group's exact baseline: one line per group it borrows from, naming the columns, and,
    for a group with the lean MLP target, why it borrows none. [] when there is nothing to say."""
    by_donor: dict[tuple[int, tuple[str, ...]], list[str]] = {}
    for column in group.columns:
        if (shared := group.shared.get(column)) is not None:
            by_donor.setdefault((shared.group, shared.differs), []).append(column.label)
    lines = [
        f"Exact baseline shared from group {index} (differs only in {'/'.join(differs)}) for "
        f"{', '.join(labels)}: an exact (ratio 1) run uses the exact op whatever {'/'.join(differs)} say, "
        "so the change vs exact and the reduction factors here are against that group's ratio-1 runs."
        for (index, differs), labels in by_donor.items()
    ]
    missing = [c.label for c in group.columns if not group.cell(c, EXACT_RATIO).runs]
    if lean(group) and missing:
        lines.append(
            f"No exact baseline for {', '.join(missing)}: none is shared into a group whose targets "
            f"contain {LEAN_TARGET} (the lean MLP recomputes its hidden activation even at ratio 1, so its "
            "exact run's memory differs); add a ratio-1 run with these settings for the change vs exact."
        )
    return lines


ACCURACY_NOTE = (
    "Test accuracy in %; rows: CRS sampling ratio, columns: dataset. In parentheses: change vs ratio 1 "
    "(exact) of the same column, in points. With several seeds: mean ± sample std, the change computed on "
    "the means; n = complete runs in the cell when that differs between cells. — = no run; failed or "
    "incomplete runs are named in the cell and listed under the table."
)
MEMORY_NOTE = (
    "Peak GPU memory (torch max allocated, and max reserved) in GiB, mean over complete runs; in "
    "parentheses: reduction factor vs ratio 1 (exact) of the same dataset and settings (exact / this). "
    "CPU runs have no GPU peak and report the bytes saved for backward per training step instead. "
    "Images/s: training throughput, mean. Grad. rel. error and cos (runs with callbacks.grad_fidelity on): "
    "the run mean of ‖ĝ − g‖² / ‖g‖² and of the cosine between the sampled gradient ĝ and the exact "
    "gradient g of the same batch (classifier head excluded), mean over runs. — = no run."
)


def _group_preamble(group: Group, groups: Sequence[Group]) -> list[str]:
    lines = [f"## {group_title(group, groups)}", ""]
    lines.append("Settings: " + ", ".join(f"`{item}`" for item in config_items(group.config)))
    n_runs = accuracy_counts(group)
    if len(n_runs) == 1 and (n := n_runs.pop()) > 1:
        lines.append(f"Every cell: mean ± sample std over n={n} complete runs.")
    return [*lines, ""]


def unfinished_lines(group: Group, markdown: bool = True) -> list[str]:
    """A title, then one line per failed or incomplete run (label, status, error, run_dir); [] if none."""
    runs = unfinished_runs(group)
    if not runs:
        return []
    lines = ["Failed or incomplete runs:"]
    for run in runs:
        what = run.raw_status if run.status != "complete" else "complete but no test_acc"
        error = f": {one_line(run.error)}" if run.error else ""
        if markdown:
            lines.append(f"- {run_label(run)}: **{what}**{error} — `{run.run_dir}`")
        else:
            lines.append(f"- {run_label(run)}: {what}{error} -- {run.run_dir}")
    return lines


def _problems_md(problems: Sequence[Problem]) -> list[str]:
    if not problems:
        return []
    lines = ["## Unreadable or invalid metrics files", ""]
    return [*lines, *(f"- `{p.path}`: {one_line(p.reason)}" for p in problems), ""]


def _groups_intro_md(groups: Sequence[Group]) -> list[str]:
    if not groups:
        return ["No usable runs.", ""]
    if len(groups) == 1:
        return []
    keys = ", ".join(differing_keys(groups))
    return [
        f"The runs fall into {len(groups)} groups whose settings differ in: {keys}. "
        "Runs are only compared within a group.",
        "",
    ]


def markdown_report(
    title: str,
    note: str,
    groups: Sequence[Group],
    problems: Sequence[Problem],
    rows: Callable[[Group, Style], tuple[list[str], list[list[str]]]],
    left: int,
) -> str:
    """A Markdown file: title, note, one section per group (settings, table, failed runs), problems."""
    lines = [f"# {title}", "", note, "", *_groups_intro_md(groups)]
    for group in groups:
        header, body = rows(group, MD)
        lines += [*_group_preamble(group, groups), *markdown_table(header, body, left)]
        if shared := shared_lines(group):
            lines += ["", *(f"Note: {line}" for line in shared)]
        if unfinished := unfinished_lines(group):
            lines += ["", unfinished[0], "", *unfinished[1:]]
        lines.append("")
    return "\n".join([*lines, *_problems_md(problems)]).rstrip() + "\n"


def tex_report(
    title: str,
    groups: Sequence[Group],
    rows: Callable[[Group, Style], tuple[list[str], list[list[str]]]],
    left: int,
) -> str:
    """A LaTeX fragment: one booktabs table per group, settings in the caption, failed runs as comments."""
    lines = [f"% {title}. Generated by vitcrs.report; needs \\usepackage{{booktabs}}.", ""]
    for group in groups:
        header, body = rows(group, TEX)
        settings = ", ".join(config_items(group.config))
        notes = " ".join(shared_lines(group))  # each a sentence; appended after the settings when any
        caption = _tex_escape(
            f"{title}. {group_title(group, groups)}. Settings: {settings}" + (f". {notes}" if notes else "")
        )
        lines += latex_table(header, body, caption, left)
        lines += [f"% {line}" for line in unfinished_lines(group, markdown=False)]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def accuracy_markdown(groups: Sequence[Group], problems: Sequence[Problem]) -> str:
    """accuracy.md."""
    return markdown_report("Test accuracy (%)", ACCURACY_NOTE, groups, problems, accuracy_rows, left=1)


def accuracy_tex(groups: Sequence[Group]) -> str:
    """accuracy.tex."""
    return tex_report("Test accuracy (%)", groups, accuracy_rows, left=1)


def memory_markdown(groups: Sequence[Group], problems: Sequence[Problem]) -> str:
    """memory.md."""
    return markdown_report("Peak memory and throughput", MEMORY_NOTE, groups, problems, memory_rows, left=2)


def memory_tex(groups: Sequence[Group]) -> str:
    """memory.tex."""
    return tex_report("Peak memory and throughput", groups, memory_rows, left=2)


def _stat_json(value: Stat | None) -> dict[str, Any] | None:
    return None if value is None else {"mean": value.mean, "std": value.std, "n": value.n}


def cell_json(group: Group, cell: Cell) -> dict[str, Any]:
    """One cell as plain data. Accuracies are fractions; the drop is in points; factors are exact / this."""
    stats = (KEY.test_acc, KEY.val_acc, *(f for f, _, _ in MEMORY_FIELDS), KEY.images_per_s)
    stats += tuple(f for f, _, _ in FIDELITY_FIELDS)
    return {
        "column": cell.column.label,
        "dataset": cell.column.dataset,
        KEY.label_type: cell.column.label_type,
        "ratio": cell.ratio,
        "n_runs": len(cell.runs),
        "n_complete": len(cell.complete),
        "not_complete": cell.status_counts(),
        "seeds": cell.seeds,
        **{name: _stat_json(cell.stat(name)) for name in stats},
        "test_acc_change_pts": group.drop_pts(cell),
        "reduction": {f: group.reduction(cell, f) for f, _, _ in MEMORY_FIELDS},
        "run_dirs": [r.run_dir for r in cell.runs],
    }


def results_data(groups: Sequence[Group], problems: Sequence[Problem]) -> dict[str, Any]:
    """results.json: every group with its settings and cells, then the unusable files."""
    keys = differing_keys(groups)
    return {
        "groups": [
            {
                "group": g.index,
                KEY.settings: g.config,
                "differs": {k: g.config.get(k) for k in keys},
                "cells": [
                    cell_json(g, cell) for c in g.columns for r in g.ratios if (cell := g.cell(c, r)).runs
                ],
                "shared_exact": [
                    {
                        "column": c.label,
                        "dataset": c.dataset,
                        KEY.label_type: c.label_type,
                        "from_group": s.group,
                        "differs": list(s.differs),
                        "cell": cell_json(g, s.cell),
                    }
                    for c, s in g.shared.items()
                ],
                "unfinished": [
                    {"run_dir": r.run_dir, "status": r.raw_status, "error": r.error, "metrics": str(r.path)}
                    for r in unfinished_runs(g)
                ],
            }
            for g in groups
        ],
        "unreadable": [{"path": str(p.path), "reason": p.reason} for p in problems],
    }


def index_markdown(
    files: dict[str, str],
    inputs: dict[str, int],
    runs: Sequence[Run],
    groups: Sequence[Group],
    problems: Sequence[Problem],
    command: str,
    cwd: str,
    generated: str,
) -> str:
    """index.md: the files with what they hold, the inputs, counts and the command line."""
    by_status: dict[str, int] = {}
    for run in runs:
        by_status[run.raw_status] = by_status.get(run.raw_status, 0) + 1
    status = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "none"
    lines = [f"# vitcrs report, {generated}", "", "## Files", ""]
    lines += [f"- [{name}]({name}): {what}" for name, what in files.items()]
    lines += ["", "## Inputs", ""]
    lines += [f"- `{path}`: {n} metrics.json" for path, n in inputs.items()]
    lines += [
        "",
        f"Runs: {len(runs)} ({status}); unreadable or invalid files: {len(problems)}; "
        f"groups of settings: {len(groups)}.",
        "",
        "## Command",
        "",
        "```",
        f"cd {cwd}",
        command,
        "```",
    ]
    return "\n".join(lines) + "\n"
