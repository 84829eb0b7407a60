"""`MetricsFile`: the run's result record, `<run_dir>/metrics.json`, always whole and always current."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .grad_fidelity import GradFidelityMonitor
from .memory import PeakMemoryMonitor

# The keys of metrics.json, in file order; vitcrs.report reads exactly these.
METRICS_KEYS = (
    "status",
    "dataset",
    "label_type",
    "num_classes",
    "ratio",
    "method",
    "targets",
    "seed",
    "val_acc",
    "test_acc",
    "peak_mem_allocated_gib",
    "peak_mem_reserved_gib",
    "peak_mem_allocated_gib_per_rank",
    "peak_mem_reserved_gib_per_rank",
    "saved_bytes_per_step",
    "saved_bytes_per_step_exact",
    "sample_cache",
    "images_per_s",
    "fidelity_rel_err",
    "fidelity_cos",
    "epochs",
    "wall_time_s",
    "device",
    "world_size",
    "versions",
    "settings",
    "run_dir",
)
STATUSES = ("incomplete", "complete", "failed", "interrupted")
_UMASK = os.umask(0o022)  # read the process umask (and put it back): written files get the usual mode
os.umask(_UMASK)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` via a temporary file and `os.replace`: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes it private (0600); a result file is for everyone
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def describe_device(device: torch.device) -> str:
    """E.g. "cuda:0 (NVIDIA H100 80GB HBM3)" or "cpu"."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


class MetricsFile(Callback):
    """Keeps `path` (metrics.json) current through a run.

    record: the fields known before training (dataset, ratio, settings, ...; see METRICS_KEYS); the rest
        start as null. Written with status "incomplete" at fit start and after every validation, "complete"
        by `finish(test_acc)`, "failed" with "error" on an exception (`fail`, also called by Lightning), or
        "interrupted" with "error" saying how to resume when the exception is Lightning's SIGTERMException.
    val_acc is the best `monitor` value seen in validation (the one checkpoint selection uses); the memory
    and speed fields come from a `PeakMemoryMonitor` among the trainer's callbacks, if any, and the
    gradient-fidelity means from a `GradFidelityMonitor`; wall_time_s runs
    from fit start to `finish` (summed over resumed segments); world_size is the number of data-parallel
    processes. Only global rank 0 writes (once a trainer is known: `attach` or fit start).
    """

    def __init__(self, path: str | os.PathLike, record: dict[str, Any], monitor: str = "val/acc") -> None:
        self.path = Path(path)
        self.monitor = monitor
        self.data: dict[str, Any] = {key: None for key in METRICS_KEYS}
        self.data.update(record)
        self.data["epochs"] = self.data["epochs"] or 0
        self._trainer: Trainer | None = None
        self._start: float | None = None
        self._earlier_s = 0.0
        self._restored: dict[str, Any] | None = None

    # -- writing ---------------------------------------------------------------------------------------
    def write(self, status: str, **fields: Any) -> None:
        """Merge `fields` and the monitor's figures, set `status`, and rewrite the file atomically."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        trainer = self._trainer
        if trainer is not None and not trainer.is_global_zero:
            return
        if trainer is not None:
            for cb in trainer.callbacks:
                if isinstance(cb, (PeakMemoryMonitor, GradFidelityMonitor)):
                    self.data.update(cb.summary())
        self.data.update(fields)
        self.data["status"] = status
        if self._start is not None:
            self.data["wall_time_s"] = self._earlier_s + time.perf_counter() - self._start
        write_json_atomic(self.path, self.data)

    def finish(self, test_acc: float | None, val_acc: float | None = None) -> None:
        """Mark the run complete with its test accuracy (and, if given, the tested checkpoint's val_acc)."""
        fields = {"test_acc": test_acc} if val_acc is None else {"test_acc": test_acc, "val_acc": val_acc}
        self.write("complete", **fields)

    def fail(self, error: BaseException) -> None:
        """Mark the run failed, naming the error, or interrupted (SIGTERM), saying how to resume; a run
        already marked keeps its first mark."""
        if self.data.get("status") in ("failed", "interrupted"):
            return
        if isinstance(error, SIGTERMException):
            trainer, last = self._trainer, self.path.parent / "checkpoints" / "last.ckpt"
            where = f" at epoch {trainer.current_epoch}, step {trainer.global_step}" if trainer else ""
            self.write(
                "interrupted",
                error=f"stopped by SIGTERM{where}. Resume with the same command and ckpt_path={last}",
            )
            return
        self.write("failed", error=f"{type(error).__name__}: {error}")

    def attach(self, trainer: Trainer) -> None:
        """Know the trainer before fitting, so that only global rank 0 writes even an early failure."""
        self._trainer = trainer

    # -- Lightning hooks -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trainer = trainer
        if self._restored is not None:  # resuming a run
            state, self._restored = self._restored, None
            self.data["val_acc"], self.data["epochs"] = state["val_acc"], state["epochs"]
            self._earlier_s = state["wall_time_s"]
        self._start = time.perf_counter()
        self.write("incomplete", device=describe_device(pl_module.device), world_size=trainer.world_size)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self._trainer is None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and math.isfinite(float(value)):
            best = self.data["val_acc"]
            self.data["val_acc"] = float(value) if best is None else max(best, float(value))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.write("incomplete", epochs=trainer.current_epoch + 1)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._trainer = self._trainer or trainer
        self.fail(exception)

    def state_dict(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self._start if self._start is not None else 0.0
        epochs, trainer = self.data["epochs"], self._trainer
        if trainer is not None:
            # Epochs whose training batches are all done: at the end of validation (before on_train_epoch_end
            # counts the epoch) the current one is; at a mid-epoch checkpoint it is not; once Lightning has
            # counted it (a checkpoint at fit end), current_epoch already includes it.
            ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            epoch = trainer.fit_loop.epoch_progress.current
            uncounted = epoch.ready > epoch.completed and ready >= trainer.num_training_batches
            epochs = trainer.current_epoch + int(uncounted)
        return {
            "val_acc": self.data["val_acc"],
            "epochs": epochs,
            "wall_time_s": self._earlier_s + elapsed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied at fit start only: `trainer.test(ckpt_path=...)` loads callback states too.
        self._restored = dict(state_dict)
