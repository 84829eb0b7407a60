"""Find, read, group and aggregate `metrics.json` files. Pure data: no rendering, no writing.

Contracts:
- `read_run` never raises for a bad file: it returns a `Problem` (unreadable JSON, not an object, no usable
  dataset or ratio, an accuracy outside [0, 1]). Other missing or ill-typed fields become None.
- Only runs with status "complete" contribute numbers; "failed" and anything else ("incomplete", unknown
  statuses) are counted per cell and listed, never averaged in.
- Runs are comparable only within a `Group`: same `config` = `settings` minus the swept keys
  (dataset, label_type, ratio, seed), plus the measuring device and the package versions.
- One exception, for the exact baseline: an exact (ratio 1) run uses the exact op whatever `method`,
  `targets` and `prob` say, so a group with no ratio-1 run in a column borrows that column's exact cell from
  a group whose config differs only in those keys (`share_exact_baselines`; see `SHARED_KEYS`). Never into
  or out of a group whose targets contain "mlp": the lean MLP recomputes its hidden activation even at
  ratio 1, so its exact run's memory differs.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitcrs.record import CRS_SETTINGS, KEY, LATER_CRS_SETTINGS, METRICS_FILE, RunRecord

SWEPT_KEYS = (KEY.dataset, KEY.label_type, KEY.ratio, KEY.seed)
EXACT_RATIO = 1.0
KNOWN_DATASETS = ("cifar10", "cifar100")
# config keys that an exact (ratio 1) run ignores: groups that differ only in these share an exact baseline
SHARED_KEYS = CRS_SETTINGS
LEAN_TARGET = "mlp"  # a target that changes the exact run too (recomputed MLP hidden activation)


@dataclass(frozen=True)
class Problem:
    """A metrics.json that could not be used, and why."""

    path: Path
    reason: str


@dataclass(frozen=True, eq=False)
class Run:
    """One training run, as read from its metrics.json. Accuracies are fractions in [0, 1]."""

    path: Path
    run_dir: str
    status: str  # "complete" | "failed" | "incomplete"; any other raw status is mapped to "incomplete"
    raw_status: str
    dataset: str  # canonical: "cifar100_coarse" is read as dataset "cifar100", label_type "coarse"
    label_type: str
    ratio: float
    seed: int | None
    test_acc: float | None
    val_acc: float | None
    peak_mem_allocated_gib: float | None
    peak_mem_reserved_gib: float | None
    saved_bytes_per_step: float | None
    images_per_s: float | None
    fidelity_rel_err: (
        float | None
    )  # run mean of ‖ĝ − g‖² / ‖g‖² (callbacks.grad_fidelity), None if unmeasured
    fidelity_cos: float | None
    error: str | None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Column:
    """A table column: one dataset with one label type."""

    dataset: str
    label_type: str

    @property
    def label(self) -> str:
        """Display name: "CIFAR-10", "CIFAR-100 fine", "CIFAR-100 coarse"; other names as-is (+ label type
        when it is not "fine")."""
        if self.dataset == "cifar100":
            return f"CIFAR-100 {self.label_type}"
        name = "CIFAR-10" if self.dataset == "cifar10" else self.dataset
        return name if self.label_type == "fine" else f"{name} {self.label_type}"

    @property
    def sort_key(self) -> tuple[int, str, int, str]:
        """CIFAR-10, CIFAR-100 fine, CIFAR-100 coarse, then other datasets by name."""
        known = KNOWN_DATASETS.index(self.dataset) if self.dataset in KNOWN_DATASETS else len(KNOWN_DATASETS)
        label_rank = {"fine": 0, "coarse": 1}.get(self.label_type, 2)
        return (known, self.dataset, label_rank, self.label_type)


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (None when n < 2) and count of a list of numbers."""

    mean: float
    std: float | None
    n: int


def stat(values: Sequence[float]) -> Stat | None:
    """`Stat` of `values`, or None when there are none."""
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else None
    return Stat(statistics.fmean(values), std, len(values))


@dataclass
class Cell:
    """The runs of one group at one (column, ratio)."""

    column: Column
    ratio: float
    runs: list[Run] = field(default_factory=list)

    @property
    def complete(self) -> list[Run]:
        """Runs with status "complete"."""
        return [r for r in self.runs if r.status == "complete"]

    def stat(self, attr: str) -> Stat | None:
        """`Stat` of `attr` (a numeric `Run` field) over the complete runs that report it."""
        return stat([v for r in self.complete if (v := getattr(r, attr)) is not None])

    def status_counts(self) -> dict[str, int]:
        """How many runs did not give a test accuracy, by reason: failed, incomplete, no test_acc."""
        counts = {
            "failed": sum(r.status == "failed" for r in self.runs),
            "incomplete": sum(r.status == "incomplete" for r in self.runs),
            "no test_acc": sum(r.status == "complete" and r.test_acc is None for r in self.runs),
        }
        return {k: v for k, v in counts.items() if v}

    @property
    def seeds(self) -> list[int]:
        """Seeds of the complete runs, sorted."""
        return sorted(r.seed for r in self.complete if r.seed is not None)


@dataclass(frozen=True)
class SharedExact:
    """An exact (ratio 1) cell borrowed from group `group`, whose config differs only in `differs`."""

    group: int
    differs: tuple[str, ...]
    cell: Cell


@dataclass
class Group:
    """Runs that share one `config`; `index` counts from 1 in report order. `shared` holds, per column
    without an own ratio-1 run, the exact cell borrowed from another group (see `share_exact_baselines`)."""

    index: int
    config: dict[str, Any]
    runs: list[Run]
    shared: dict[Column, SharedExact] = field(default_factory=dict, repr=False, compare=False)

    @property
    def columns(self) -> list[Column]:
        """The group's dataset columns, in display order."""
        return sorted({Column(r.dataset, r.label_type) for r in self.runs}, key=lambda c: c.sort_key)

    @property
    def ratios(self) -> list[float]:
        """The group's ratios: 1 (exact) first, then descending."""
        return sorted({r.ratio for r in self.runs}, key=lambda x: (x != EXACT_RATIO, -x))

    @property
    def table_ratios(self) -> list[float]:
        """`ratios`, with 1 (exact) first also when the group's only exact cells are borrowed."""
        ratios = self.ratios
        return [EXACT_RATIO, *ratios] if self.shared and EXACT_RATIO not in ratios else ratios

    def cell(self, column: Column, ratio: float) -> Cell:
        """The cell at (column, ratio); empty when no run is there. Own runs only."""
        runs = [r for r in self.runs if Column(r.dataset, r.label_type) == column and r.ratio == ratio]
        return Cell(column, ratio, runs)

    def exact_cell(self, column: Column) -> Cell:
        """The ratio-1 cell of `column`: the group's own, else the one borrowed (`shared`), else empty."""
        shared = self.shared.get(column)
        return shared.cell if shared is not None else self.cell(column, EXACT_RATIO)

    def table_cell(self, column: Column, ratio: float) -> Cell:
        """The cell shown at (column, ratio): `exact_cell` at ratio 1, else `cell`."""
        return self.exact_cell(column) if ratio == EXACT_RATIO else self.cell(column, ratio)

    def drop_pts(self, cell: Cell) -> float | None:
        """Mean test accuracy of `cell` minus that of ratio 1 in the same column (own or borrowed), in
        points; None at ratio 1 or when either side has no accuracy."""
        if cell.ratio == EXACT_RATIO:
            return None
        acc, ref = cell.stat(KEY.test_acc), self.exact_cell(cell.column).stat(KEY.test_acc)
        return None if acc is None or ref is None else 100.0 * (acc.mean - ref.mean)

    def reduction(self, cell: Cell, attr: str) -> float | None:
        """Reference mean of `attr` at ratio 1 (own or borrowed) divided by the cell's mean (2.0 = half the
        memory); None at ratio 1, when either side is missing, or when the cell's mean is 0."""
        if cell.ratio == EXACT_RATIO:
            return None
        val, ref = cell.stat(attr), self.exact_cell(cell.column).stat(attr)
        if val is None or ref is None or val.mean == 0:
            return None
        return ref.mean / val.mean


def natural_key(path: Path) -> list[Any]:
    """Sort key that orders multirun subdirs 0, 1, 2, …, 10 numerically."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_metrics(root: Path) -> list[Path]:
    """All metrics.json files at or under `root` (a file or a directory), naturally sorted. Hidden
    directories and __pycache__ are skipped; symlinked directories are not followed."""
    if root.is_file():
        return [root] if root.name == METRICS_FILE else []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        if METRICS_FILE in filenames:
            found.append(Path(dirpath) / METRICS_FILE)
    return sorted(found, key=natural_key)


def _number(value: Any) -> float | None:
    """A finite int/float as float, else None (bools, strings, NaN and inf are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _config(record: RunRecord) -> dict[str, Any]:
    """What must match for runs to be comparable: settings minus the swept keys, then device and versions.
    Without a `settings` object, the top-level method and targets (where not null) stand in for it; a
    `LATER_CRS_SETTINGS` key a record lacks takes its default (as a resumed checkpoint's settings do:
    `vitcrs.resume.crs_changes`)."""
    settings = record.settings
    if not isinstance(settings, dict):
        top = {"method": record.method, "targets": record.targets}
        settings = {k: v for k, v in top.items() if v is not None}
    elif missing := [k for k in LATER_CRS_SETTINGS if k not in settings]:
        from vitcrs.crs import CRSConfig  # imports torch: only for records that lack a key

        defaults = CRSConfig().to_dict()
        settings = {**settings, **{k: defaults[k] for k in missing}}
    config = {str(k): v for k, v in settings.items() if k not in SWEPT_KEYS}
    if isinstance(record.device, str):
        config["device" if "device" not in config else "device_name"] = record.device
    if isinstance(record.versions, dict):
        config.update({f"versions.{k}": v for k, v in record.versions.items()})
    return config


def _dataset(record: RunRecord) -> tuple[str, str] | str:
    """(canonical dataset, label_type), or a reason string when unusable."""
    dataset, label_type = record.dataset, record.label_type
    if not isinstance(dataset, str) or not dataset:
        return "no dataset"
    if dataset.endswith("_coarse") and dataset[: -len("_coarse")] in KNOWN_DATASETS:
        dataset, label_type = dataset[: -len("_coarse")], "coarse"
    return dataset, label_type if isinstance(label_type, str) and label_type else "fine"


def read_run(path: Path) -> Run | Problem:
    """Read one metrics.json. Never raises for file content; see the module docstring."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return Problem(path, f"unreadable: {type(exc).__name__}: {exc}")
    if not isinstance(raw, dict):
        return Problem(path, f"not a JSON object (a {type(raw).__name__})")
    record = RunRecord.from_json(raw)
    dataset = _dataset(record)
    if isinstance(dataset, str):
        return Problem(path, dataset)
    ratio = _number(record.ratio)
    if ratio is None or ratio <= 0:
        return Problem(path, f"no usable ratio ({record.ratio!r})")
    test_acc, val_acc = _number(record.test_acc), _number(record.val_acc)
    for key, acc in ((KEY.test_acc, test_acc), (KEY.val_acc, val_acc)):
        if acc is not None and not 0.0 <= acc <= 1.0:
            return Problem(path, f"{key} {acc} is not a fraction in [0, 1]")
    # A file without a status (hand-written) is complete when it has a test accuracy.
    status = (
        record.status if record.status is not None else "complete" if test_acc is not None else "incomplete"
    )
    raw_status = str(status)
    seed, error = record.seed, record.error
    return Run(
        path=path,
        run_dir=record.run_dir if isinstance(record.run_dir, str) else str(path.parent),
        status=raw_status if raw_status in ("complete", "failed") else "incomplete",
        raw_status=raw_status,
        dataset=dataset[0],
        label_type=dataset[1],
        ratio=float(f"{ratio:.6g}"),  # 6 significant digits: 1e-9 stays 1e-9 (a label, not a 0)
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        test_acc=test_acc,
        val_acc=val_acc,
        peak_mem_allocated_gib=_number(record.peak_mem_allocated_gib),
        peak_mem_reserved_gib=_number(record.peak_mem_reserved_gib),
        saved_bytes_per_step=_number(record.saved_bytes_per_step),
        images_per_s=_number(record.images_per_s),
        fidelity_rel_err=_number(record.fidelity_rel_err),
        fidelity_cos=_number(record.fidelity_cos),
        error=None if error is None else str(error),
        config=_config(record),
    )


def group_runs(runs: Iterable[Run]) -> list[Group]:
    """Split runs by `config`, groups ordered by their first run (in the given order); then share exact
    baselines between them (`share_exact_baselines`)."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = json.dumps(run.config, sort_keys=True, default=str)
        if key not in groups:
            groups[key] = Group(len(groups) + 1, run.config, [])
        groups[key].runs.append(run)
    return share_exact_baselines(list(groups.values()))


def target_set(config: dict[str, Any]) -> frozenset[str]:
    """The CRS targets of a config as a set (a list, or a comma-separated string); empty when unset."""
    targets = config.get("targets")
    if isinstance(targets, str):
        targets = targets.split(",")
    if not isinstance(targets, list | tuple):
        return frozenset()
    return frozenset(str(t).strip() for t in targets) - {""}


def _value_text(config: dict[str, Any], key: str) -> str | None:
    """A config value as canonical JSON, to compare; None for a missing key (distinct from JSON null)."""
    return json.dumps(config[key], sort_keys=True, default=str) if key in config else None


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, ...]:
    """The keys whose value differs between two configs (a missing key counts as a value), in key order."""
    return tuple(k for k in dict.fromkeys([*a, *b]) if _value_text(a, k) != _value_text(b, k))


def lean(group: Group) -> bool:
    """Whether the group's targets contain the lean MLP, which changes even its exact run."""
    return LEAN_TARGET in target_set(group.config)


def share_exact_baselines(groups: list[Group]) -> list[Group]:
    """Fill each group's `shared`: for every column where the group has no ratio-1 run, the ratio-1 cell
    of another group whose config differs only in `SHARED_KEYS` and that has complete runs there. Neither
    side may have "mlp" among its targets. Preferred: identical targets, then the fewest differing keys,
    then the lowest group index. Returns `groups`."""
    for group in groups:
        group.shared.clear()
    for group in groups:
        if lean(group):
            continue
        for column in group.columns:
            if group.cell(column, EXACT_RATIO).runs:
                continue
            candidates = []
            for other in groups:
                differs = config_diff(group.config, other.config)
                if other is group or lean(other) or not set(differs) <= set(SHARED_KEYS):
                    continue
                cell = other.cell(column, EXACT_RATIO)
                if not cell.complete:
                    continue
                same_targets = target_set(other.config) == target_set(group.config)
                candidates.append(((not same_targets, len(differs), other.index), other, differs, cell))
            if candidates:
                _, other, differs, cell = min(candidates, key=lambda c: c[0])
                group.shared[column] = SharedExact(other.index, differs, cell)
    return groups


def differing_keys(groups: Sequence[Group]) -> list[str]:
    """Config keys whose value is not the same in every group (a missing key counts as a value)."""
    keys = list(dict.fromkeys(k for g in groups for k in g.config))
    return [k for k in keys if len({_value_text(g.config, k) for g in groups}) > 1]
