"""`MetricsFile`: the run's result record, `<run_dir>/metrics.json`, always whole and always current."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import lightning
import torch
import transformers
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException

import vitcrs
from vitcrs.errors import ConfigError
from vitcrs.files import write_json_atomic
from vitcrs.record import CRS_SETTINGS, KEY, METRICS_FILE, STATUSES, RunRecord
from vitcrs.run_dir import last_checkpoint
from vitcrs.settings import RunSettings

from .grad_fidelity import GradFidelityMonitor
from .memory import PeakMemoryMonitor


def describe_device(device: torch.device) -> str:
    """E.g. "cuda:0 (NVIDIA H100 80GB HBM3)" or "cpu"."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def describe_run(settings: RunSettings, crs_before_resume: dict[str, Any] | None = None) -> RunRecord:
    """The fields of metrics.json known before training, from the run's checked settings (the sampling
    settings in effect, `CRSConfig.in_effect`, so that runs that sample alike are recorded alike);
    `crs_before_resume`: the crs settings a resumed checkpoint had where they differ (allow_crs_change=true),
    recorded under settings. The settings that depend on the trainer (precision, world size, effective batch)
    are filled in by `MetricsFile.attach`."""
    crs, datamodule = settings.crs, settings.datamodule
    crs_node = crs.to_dict()
    recorded = {
        "model": settings.model_label,
        "attn_implementation": settings.attn_implementation,
        "precision": settings.trainer.precision,
        "batch_size": datamodule.batch_size,
        "max_epochs": settings.trainer.max_epochs,
        "lr": settings.optim.lr,
        "image_size": datamodule.image_size,
        **{key: crs_node[key] for key in CRS_SETTINGS},
        "limit_train": datamodule.limit_train,
    }
    if crs_before_resume:
        recorded["crs_before_resume"] = crs_before_resume
    return RunRecord(
        dataset=datamodule.name,
        label_type=datamodule.label_type,
        num_classes=datamodule.num_classes,
        ratio=float(crs.ratio),
        method=crs.method,
        targets=list(crs.targets),
        seed=settings.seed,
        versions={
            "vitcrs": vitcrs.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lightning": lightning.__version__,
        },
        settings=recorded,
        run_dir=str(settings.run_dir.resolve()),
    )


def record_refusal(run_dir: str | os.PathLike, err: ConfigError, **fields: Any) -> None:
    """A sweep job refused before training: a "failed" metrics.json in `run_dir` naming the error, with the
    RunRecord `fields` its configuration gives as they are (unchecked), unless the dir has a record already
    (an earlier run's, left as it is)."""
    path = Path(run_dir) / METRICS_FILE
    if path.exists():
        return
    record = RunRecord(
        status="failed", run_dir=str(path.parent.resolve()), error=f"ConfigError: {err}", **fields
    )
    write_json_atomic(path, record.to_json())


def next_segment(path: Path) -> Path:
    """`<stem>.segment-N<suffix>` beside `path`, N after the highest taken (with one removed, a count of the
    kept ones would name a kept one)."""
    prefix = f"{path.stem}.segment-"
    taken = [p.name[len(prefix) : -len(path.suffix)] for p in path.parent.glob(f"{prefix}*{path.suffix}")]
    n = 1 + max((int(i) for i in taken if i.isdigit()), default=0)
    return path.with_name(f"{prefix}{n}{path.suffix}")


class MetricsFile(Callback):
    """Keeps `path` (metrics.json) current through a run.

    record: the fields known before training (`describe_run`); the rest start as null. Written with status
        "incomplete" at fit start and after every validation, "complete" by `finish(test_acc)`, "failed" with
        error on an exception (`fail`, also called by Lightning), or "interrupted" with error saying how to
        resume when the exception is Lightning's SIGTERMException.
    val_acc is the best `monitor` value seen in validation (the one checkpoint selection uses); the memory
    and speed fields come from a `PeakMemoryMonitor` among the trainer's callbacks, if any, and the
    gradient-fidelity means from a `GradFidelityMonitor`; wall_time_s runs
    from fit start to `finish` (summed over resumed segments); world_size is the number of data-parallel
    processes. Only global rank 0 writes (once a trainer is known: `attach` or fit start).
    A ConfigError (a refused setting) before this launch first wrote the file leaves it as it was: a resumed
    run's record is the earlier launch's until fit start.
    `resume_settings` (`vitcrs.resume.run_settings`) go into checkpoints, for the next resume to compare.
    """

    def __init__(self, path: str | os.PathLike, record: RunRecord, monitor: str = "val/acc") -> None:
        self.path = Path(path)
        self.monitor = monitor
        self.record = record
        self._trainer: Trainer | None = None
        self._start: float | None = None
        self._earlier_s = 0.0
        self._restored: dict[str, Any] | None = None
        self._written = False  # whether this launch has written the file
        self.resume_settings: dict[str, Any] = {}

    # -- writing ---------------------------------------------------------------------------------------
    def write(self, status: str, **fields: Any) -> None:
        """Set `fields` (RunRecord attributes), the monitors' figures and `status`; rewrite the file
        atomically."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        trainer = self._trainer
        if trainer is not None and not trainer.is_global_zero:
            return
        if trainer is not None:
            for cb in trainer.callbacks:
                if isinstance(cb, (PeakMemoryMonitor, GradFidelityMonitor)):
                    cb.fill(self.record)
        self.record = dataclasses.replace(self.record, **fields, status=status)
        if self._start is not None:
            self.record.wall_time_s = self._earlier_s + time.perf_counter() - self._start
        write_json_atomic(self.path, self.record.to_json())
        self._written = True

    def finish(
        self, test_acc: float | None, val_acc: float | None = None, sample_cache: dict[str, Any] | None = None
    ) -> None:
        """Mark the run complete with its test accuracy (and, if given, the tested checkpoint's val_acc) and
        the model's sample-cache figures (`ViTClassifier.sample_cache_summary`)."""
        val_acc = self.record.val_acc if val_acc is None else val_acc
        self.write("complete", test_acc=test_acc, val_acc=val_acc, sample_cache=sample_cache)

    def fail(self, error: BaseException) -> None:
        """Mark the run failed, naming the error, or interrupted (SIGTERM), saying how to resume; a run
        already marked keeps its first mark, and a refused setting (ConfigError) leaves a record this launch
        has not written yet (a resumed run's) as it was."""
        if self.record.status in ("failed", "interrupted"):
            return
        if isinstance(error, ConfigError) and not self._written:
            return
        if isinstance(error, SIGTERMException):
            trainer, last = self._trainer, last_checkpoint(self.path.parent)
            where = f" at epoch {trainer.current_epoch}, step {trainer.global_step}" if trainer else ""
            self.write(
                "interrupted",
                error=f"stopped by SIGTERM{where}. Resume with the same command and ckpt_path={last}",
            )
            return
        self.write("failed", error=f"{type(error).__name__}: {error}")

    def attach(self, trainer: Trainer) -> None:
        """Know the trainer before fitting, so that only global rank 0 writes even an early failure; records
        what it runs: its precision (Lightning runs a 16-mixed request on a CPU as bf16-mixed), its world size
        (also under settings when above 1) and, when it differs from the batch size, the effective batch
        (batch size x accumulate_grad_batches x world size): runs compare only with the same."""
        self._trainer = trainer
        self.record.world_size = trainer.world_size
        settings = self.record.settings
        if settings is None:
            return
        settings["precision"] = str(trainer.precision)
        if trainer.world_size > 1:
            settings[KEY.world_size] = trainer.world_size
        batch = settings.get("batch_size")
        if isinstance(batch, int):
            effective = batch * int(trainer.accumulate_grad_batches) * trainer.world_size
            if effective != batch:
                settings["effective_batch_size"] = effective

    def keep_earlier_segment(self, loggers: list[Logger]) -> None:
        """Before a resumed run rewrites them: move each CSVLogger's metrics.csv aside to
        metrics.segment-N.csv (Lightning would delete it), and copy a complete metrics.json to
        metrics.segment-N.json (a complete run trained on keeps its record beside)."""
        for logger in loggers:
            current = Path(logger.log_dir) / "metrics.csv" if isinstance(logger, CSVLogger) else None
            if current is not None and current.is_file():
                current.rename(next_segment(current))
        warnings.filterwarnings("ignore", message=r".*Previous log files in this directory will be deleted.*")
        earlier = RunRecord.read(self.path)
        if earlier is not None and earlier.status == "complete":
            shutil.copyfile(self.path, next_segment(self.path))

    # -- Lightning hooks -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trainer = trainer
        if self._restored is not None:  # resuming a run
            state, self._restored = self._restored, None
            self.record.val_acc, self.record.epochs = state[KEY.val_acc], state[KEY.epochs]
            self._earlier_s = state[KEY.wall_time_s]
        self._start = time.perf_counter()
        self.write("incomplete", device=describe_device(pl_module.device), world_size=trainer.world_size)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self._trainer is None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and math.isfinite(float(value)):
            best = self.record.val_acc
            self.record.val_acc = float(value) if best is None else max(best, float(value))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.write("incomplete", epochs=trainer.current_epoch + 1)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._trainer = self._trainer or trainer
        self.fail(exception)

    def state_dict(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self._start if self._start is not None else 0.0
        epochs, trainer = self.record.epochs, self._trainer
        if trainer is not None:
            # Epochs whose training batches are all done: at the end of validation (before on_train_epoch_end
            # counts the epoch) the current one is; at a mid-epoch checkpoint it is not; once Lightning has
            # counted it (a checkpoint at fit end), current_epoch already includes it.
            ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            epoch = trainer.fit_loop.epoch_progress.current
            uncounted = epoch.ready > epoch.completed and ready >= trainer.num_training_batches
            epochs = trainer.current_epoch + int(uncounted)
        return {
            KEY.val_acc: self.record.val_acc,
            KEY.epochs: epochs,
            KEY.wall_time_s: self._earlier_s + elapsed,
            KEY.settings: dict(self.resume_settings),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied at fit start only: `trainer.test(ckpt_path=...)` loads callback states too.
        self._restored = dict(state_dict)
