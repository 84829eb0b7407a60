"""`RunRecord`: a run's result record, `<run_dir>/metrics.json`, one typed field per key in file order.

The one home of the metrics.json schema: the callbacks fill a record's attributes, `MetricsFile` writes
`to_json()`, `vitcrs.report` reads files back with `from_json`, and README's metrics.json table is
`schema_table()` (`python -m vitcrs.report --schema`). Pure: no torch, Lightning or Hydra import.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, get_type_hints

from vitcrs.tables import markdown_table
from vitcrs.units import MIB

METRICS_FILE = "metrics.json"  # <run_dir>/metrics.json
STATUSES = ("incomplete", "complete", "failed", "interrupted")
OMIT_NULL = "omit while null"  # a field annotated with it is left out of the file while it is None
# The crs.* settings a record's `settings` hold, as in effect; a record written before the later ones were
# recorded ran their defaults (the report reads it so).
LATER_CRS_SETTINGS = ("budget", "keep_mid", "keep_dtype")
CRS_SETTINGS = ("method", "targets", "prob", *LATER_CRS_SETTINGS)


@dataclass
class RunRecord:
    """The fields of metrics.json, in file order; null (None) where not measured or not known yet."""

    status: Annotated[
        str | None,
        "`incomplete` (training, or stopped uncleanly) / `complete` (the test split evaluated) / `failed` / "
        "`interrupted` (the last two also with `error`)",
    ] = None
    dataset: Annotated[
        str | None,
        "the data: `cifar10`, `cifar100`, `synthetic` or an image folder's name",
    ] = None
    label_type: Annotated[str | None, "`fine`, or `coarse` (CIFAR-100's 20 superclasses)"] = None
    num_classes: Annotated[
        int | None,
        "classes of the task, e.g. 10, 100, or 20 for `cifar100`, `coarse`",
    ] = None
    ratio: Annotated[float | None, "`crs.ratio`, the sampling ratio (1.0: exact)"] = None
    method: Annotated[str | None, "`crs.method`: `crs` or `wta_crs`"] = None
    targets: Annotated[list[str] | None, "`crs.targets`: the sampled ops"] = None
    seed: Annotated[int | None, "`seed`"] = None
    val_acc: Annotated[
        float | None,
        "best validation accuracy (top-1, fraction): the score of the checkpoint selected; null before the "
        "first validation",
    ] = None
    test_acc: Annotated[
        float | None,
        "accuracy of that checkpoint on the official test split; null until complete",
    ] = None
    peak_mem_allocated_gib: Annotated[
        float | None,
        "CUDA peak allocated memory over the run (GiB = 2³⁰ bytes), the largest of any rank; null on CPU",
    ] = None
    peak_mem_reserved_gib: Annotated[float | None, "the same for reserved memory; null on CPU"] = None
    peak_mem_allocated_gib_per_rank: Annotated[
        list[float | None] | None,
        "each rank's peak allocated GiB, in rank order; null on CPU",
    ] = None
    peak_mem_reserved_gib_per_rank: Annotated[
        list[float | None] | None,
        "each rank's peak reserved GiB, in rank order; null on CPU",
    ] = None
    saved_bytes_per_step: Annotated[
        int | None,
        "bytes of non-parameter tensors kept for backward in one training step (measured on the first "
        "batch, per process)",
    ] = None
    saved_bytes_per_step_exact: Annotated[
        int | None,
        "the same batch through the same network run exact (no CRS), measured side by side; null when "
        "nothing is injected",
    ] = None
    sample_cache: Annotated[
        dict[str, Any] | None,
        "`crs.prob=sample_cache` only (else null): `format`, `images` (training images, one cache row each), "
        "`bytes_per_image` (analytic), `host_bytes` (what the entries take at the end, this process)",
    ] = None
    images_per_s: Annotated[
        float | None,
        "training throughput of all ranks together: images over the time of training batches only, after 2 "
        "warm-up batches",
    ] = None
    fidelity_rel_err: Annotated[
        float | None,
        "run mean of `fidelity/rel_err` (‖ĝ − g‖² / ‖g‖², sampled vs exact gradient of the same batch, "
        "classifier head excluded); null unless `callbacks.grad_fidelity.every_n_steps` > 0",
    ] = None
    fidelity_cos: Annotated[
        float | None,
        "run mean of `fidelity/cos` (cosine of the same two gradients); null unless "
        "`callbacks.grad_fidelity.every_n_steps` > 0",
    ] = None
    epochs: Annotated[int, "epochs completed"] = 0
    wall_time_s: Annotated[
        float | None,
        "seconds from the start of training to the end of testing (summed over resumed segments)",
    ] = None
    device: Annotated[str | None, "e.g. `cuda:0 (NVIDIA H100 80GB HBM3)` or `cpu`"] = None
    world_size: Annotated[
        int | None,
        "data-parallel processes; a value above 1 also goes into `settings`",
    ] = None
    versions: Annotated[dict[str, str] | None, "`vitcrs`, `torch`, `transformers`, `lightning`"] = None
    settings: Annotated[
        dict[str, Any] | None,
        "`model`, `attn_implementation`, `precision` (as run: `16-mixed` on a CPU runs `bf16-mixed`), "
        "`batch_size` (per process), `max_epochs`, `lr`, `image_size`, the crs settings "
        + ", ".join(f"`{k}`" for k in CRS_SETTINGS)
        + " (as in effect: e.g. `prob` `norm` where no target draws by it), `limit_train` (and `world_size` "
        "above 1; "
        "`effective_batch_size`, batch_size x accumulate_grad_batches x world_size, where it differs from "
        "batch_size; `crs_before_resume`, the crs settings of a checkpoint resumed with "
        "`allow_crs_change=true`): runs are compared only when these match",
    ] = None
    run_dir: Annotated[str | None, "absolute path of the run directory"] = None
    error: Annotated[
        str | None,
        "`failed`: the exception (`Type: message`); `interrupted`: where it stopped and how to resume; "
        "absent otherwise",
        OMIT_NULL,
    ] = None

    def to_json(self) -> dict[str, Any]:
        """The metrics.json object: every key in field order, but `error` only once set."""
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if v is not None or k not in _OMITTED_WHILE_NULL}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        """A record of a metrics.json object as written by any vitcrs version: keys it lacks (older files)
        are null, keys it has beyond these are ignored. Values are taken as found, unchecked (the reader
        checks what it uses)."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    @classmethod
    def read(cls, path: str | os.PathLike) -> RunRecord | None:
        """The record of the metrics.json at `path`; None when it is missing, unreadable or no object."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return cls.from_json(data) if isinstance(data, dict) else None

    def memory_summary(self) -> str:
        """One line of the run's memory and speed figures, with the reduction vs the exact baseline."""
        parts = []
        saved, exact = self.saved_bytes_per_step, self.saved_bytes_per_step_exact
        if saved is not None:
            part = f"saved for backward {saved / MIB:.1f} MiB/step"
            if exact is not None and saved > 0:
                part += f" (exact: {exact / MIB:.1f} MiB, {exact / saved:.2f}x less)"
            parts.append(part)
        if self.peak_mem_allocated_gib is not None:
            parts.append(f"peak GPU {self.peak_mem_allocated_gib:.2f} GiB allocated")
            parts.append(f"{self.peak_mem_reserved_gib:.2f} GiB reserved")
        if self.images_per_s is not None:
            parts.append(f"{self.images_per_s:.0f} images/s")
        return ", ".join(parts) or "not measured"


_HINTS = get_type_hints(RunRecord, include_extras=True)
DOCS = {f.name: _HINTS[f.name].__metadata__[0] for f in dataclasses.fields(RunRecord)}  # key -> its doc
_OMITTED_WHILE_NULL = {
    f.name for f in dataclasses.fields(RunRecord) if OMIT_NULL in _HINTS[f.name].__metadata__
}
# The keys every metrics.json has, in file order (`error` comes after them once set).
METRICS_KEYS = tuple(name for name in DOCS if name not in _OMITTED_WHILE_NULL)
# KEY.<field>: a key by name, for code that names one as data (the report's tables, the callbacks' checkpoint
# states); taken from the fields, so each key is spelled once, here (a misspelt one is an AttributeError).
KEY = SimpleNamespace(**{name: name for name in DOCS})


def schema_table() -> str:
    """README's metrics.json table: one row per key with its doc."""
    return (
        "\n".join(markdown_table(["key", "meaning"], [[f"`{name}`", doc] for name, doc in DOCS.items()]))
        + "\n"
    )
