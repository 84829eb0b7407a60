"""PNG plots of a report: accuracy vs ratio, memory vs ratio, accuracy vs memory.

Each figure has one panel per group of settings, so runs that are not comparable are never drawn on one
axis. Memory is the GPU peak allocated when the group has one, else saved-for-backward bytes per step
(MiB). Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vitcrs.record import KEY
from vitcrs.report.data import Column, Group, Stat
from vitcrs.units import MIB

PLOT_FILES = {
    "accuracy_vs_ratio.png": "test accuracy vs sampling ratio, one line per dataset",
    "memory_vs_ratio.png": "peak memory (or saved bytes on CPU) vs sampling ratio, one line per dataset",
    "accuracy_vs_memory.png": "test accuracy vs peak memory, one point per dataset and ratio",
}


def memory_measure(group: Group) -> tuple[str, float, str]:
    """(run field, divisor, axis label) of the group's memory measure: GPU peak if any, else saved bytes."""
    if any(r.peak_mem_allocated_gib is not None for r in group.runs):
        return KEY.peak_mem_allocated_gib, 1.0, "peak memory allocated (GiB)"
    return KEY.saved_bytes_per_step, MIB, "saved for backward per step (MiB)"


def _series(group: Group, column: Column, attr: str) -> tuple[list[float], list[Stat]]:
    """The ratios that have a value of `attr` in `column`, and those values' stats."""
    points = [(r, s) for r in group.ratios if (s := group.cell(column, r).stat(attr)) is not None]
    return [r for r, _ in points], [s for _, s in points]


def _line_panel(ax: Axes, group: Group, attr: str, scale: float, ylabel: str) -> bool:
    """One line per column: `attr` times `scale` vs ratio, with ± std bars. False if nothing was drawn."""
    drawn = False
    for column in group.columns:
        ratios, stats = _series(group, column, attr)
        if not ratios:
            continue
        means, errs = [s.mean * scale for s in stats], [(s.std or 0.0) * scale for s in stats]
        ax.errorbar(ratios, means, yerr=errs, marker="o", capsize=3, label=column.label)
        drawn = True
    ax.set_xticks(group.ratios)
    ax.set_xlabel("sampling ratio (1 = exact)")
    ax.set_ylabel(ylabel)
    return drawn


def _accuracy_vs_ratio(ax: Axes, group: Group) -> bool:
    return _line_panel(ax, group, KEY.test_acc, 100.0, "test accuracy (%)")


def _memory_vs_ratio(ax: Axes, group: Group) -> bool:
    attr, divisor, label = memory_measure(group)
    return _line_panel(ax, group, attr, 1.0 / divisor, label)


def _accuracy_vs_memory(ax: Axes, group: Group) -> bool:
    """One point per (column, ratio) with both accuracy and memory, annotated with the ratio ("1" = exact)."""
    attr, divisor, label = memory_measure(group)
    drawn = False
    for column in group.columns:
        points = []
        for ratio in group.ratios:
            cell = group.cell(column, ratio)
            acc, mem = cell.stat(KEY.test_acc), cell.stat(attr)
            if acc is not None and mem is not None:
                points.append((mem.mean / divisor, 100.0 * acc.mean, ratio))
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], "o", label=column.label)
        for x, y, ratio in points:
            ax.annotate(f"{ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        drawn = True
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy (%)")
    return drawn


PANELS: dict[str, Callable[[Axes, Group], bool]] = {
    "accuracy_vs_ratio.png": _accuracy_vs_ratio,
    "memory_vs_ratio.png": _memory_vs_ratio,
    "accuracy_vs_memory.png": _accuracy_vs_memory,
}


def _figure(groups: Sequence[Group], panel: Callable[[Axes, Group], bool]) -> Figure:
    """A figure with one panel per group (at most 3 per row); an empty panel says so."""
    ncols = max(1, min(3, len(groups)))
    nrows = max(1, math.ceil(len(groups) / ncols))
    fig = Figure(figsize=(5.0 * ncols, 4.0 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, group in zip(axes, groups, strict=False):
        if len(groups) > 1:
            ax.set_title(f"Group {group.index}", fontsize=10)
        if panel(ax, group):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no completed runs", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    if not groups:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no usable runs", ha="center", va="center", transform=axes[0].transAxes)
    return fig


def write_plots(groups: Sequence[Group], out: Path) -> list[Path]:
    """Write the PNGs of `PLOT_FILES` into `out`; returns their paths."""
    paths = []
    for name, panel in PANELS.items():
        path = out / name
        _figure(groups, panel).savefig(path, dpi=120)
        paths.append(path)
    return paths
