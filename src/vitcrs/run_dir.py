"""The run dir: where a run's files are (its last checkpoint; the run dir of a checkpoint; Hydra's saved
config), one run at a time (a lock the kernel drops when its process ends), and what an existing run dir must
hold before a launch may write into it (its files of the right kinds, no complete record)."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import IO, Any

from vitcrs.errors import ConfigError
from vitcrs.record import METRICS_FILE, RunRecord

LOCK_NAME = ".vitcrs.lock"  # <run_dir>/.vitcrs.lock: flock-ed by the run writing there; holds its pid
LAST = "last"  # ckpt_path=last: <run_dir>/checkpoints/last.ckpt
log = logging.getLogger(__name__)


def last_checkpoint(run_dir: str | os.PathLike) -> Path:
    """Where a run keeps its latest checkpoint: <run_dir>/checkpoints/last.ckpt (it may not exist yet)."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str | os.PathLike) -> str | None:
    """`last` -> <run_dir>/checkpoints/last.ckpt when it exists (else None: a fresh start); paths as given."""
    if ckpt_path != LAST:
        return ckpt_path
    last = last_checkpoint(run_dir)
    if last.is_file():
        return str(last)
    log.warning("ckpt_path=last: there is no %s yet, so this run starts from scratch", last)
    return None


def checkpoint_run_dir(ckpt_path: Any, default: str) -> str:
    """Resolver `vitcrs.run_dir`: the run dir of an existing <run dir>/checkpoints/*.ckpt, else `default`.

    Lets `ckpt_path=<run dir>/checkpoints/last.ckpt` continue the run in its own directory.
    """
    if isinstance(ckpt_path, str) and ckpt_path not in ("", LAST):
        path = Path(ckpt_path).expanduser()
        if path.is_file() and path.parent.name == "checkpoints":
            return str(path.parent.parent)
    return default


def hydra_output_subdir(run_dir: Any, stamp: str) -> str | None:
    """Resolver `vitcrs.hydra_subdir`: `.hydra`, or `.hydra/<stamp>` when the run dir already has a config.

    A resumed (or re-used) run dir keeps its original `.hydra/config.yaml`; each later launch gets its own.
    None (nothing saved) in the tasks of a multi-task SLURM job other than the first: they share its dir.
    """
    if os.environ.get("SLURM_PROCID", "0") != "0":
        return None
    if (Path(str(run_dir)) / ".hydra" / "config.yaml").is_file():
        return f".hydra/{stamp}"
    return ".hydra"


class RunDirInUse(ConfigError):
    """Another live process holds the run dir's lock."""


class RunAlreadyComplete(ConfigError):
    """The run dir records a complete run that the launch would overwrite (`val_acc`: its recorded score)."""

    def __init__(self, message: str, val_acc: float | None) -> None:
        super().__init__(message)
        self.val_acc = val_acc


class RunDirLock:
    """An exclusive `flock` on <run_dir>/.vitcrs.lock, held until `release()` or the process ends.

    The kernel drops the lock when the process dies, however it dies (SIGKILL, OOM, a lost node), so a killed
    run never leaves its dir locked; the file itself stays and is re-used. Raises RunDirInUse naming the
    holder's pid when another process holds it.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file: IO[str] = open(self.path, "a+")  # noqa: SIM115 (held open while the lock lasts)
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise RunDirInUse(
                f"run dir {str(self.path.parent)!r} is in use by another vitcrs run (pid {holder} holds "
                f"{self.path}): two runs must not write one metrics.json, one set of checkpoints and one CSV "
                "log. Wait for that run to end, or give this one its own dir with hydra.run.dir=<new dir> "
                "(runs started in the same second share the default outputs/<date>/<time>)."
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file: IO[str] | None = file

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the flock
            self._file = None


def check_run_dir(run_dir: str | os.PathLike, epochs_done: int | None, max_epochs: int) -> None:
    """ConfigError unless a launch may write into `run_dir`: `checkpoints` a directory and `metrics.json` a
    file where they exist, and no record of a complete run that the launch would overwrite: a complete run is
    only resumed to train on (its checkpoint has `epochs_done` < `max_epochs`; None: a fresh start), and then
    `MetricsFile.keep_earlier_segment` keeps its record."""
    run_dir = Path(run_dir)
    checkpoints, record = last_checkpoint(run_dir).parent, run_dir / METRICS_FILE
    if checkpoints.exists() and not checkpoints.is_dir():
        raise ConfigError(
            f"{checkpoints} exists and is not a directory: the run's checkpoints go there. Move it away, or "
            "give the run another dir with hydra.run.dir=<new dir>."
        )
    if record.exists() and not record.is_file():
        raise ConfigError(
            f"{record} exists and is not a file: the run's record goes there. Move it away, or give the run "
            "another dir with hydra.run.dir=<new dir>."
        )
    data = RunRecord.read(record)
    if data is not None and data.status == "complete" and (epochs_done is None or epochs_done >= max_epochs):
        what = "start afresh over it" if epochs_done is None else "only test again and overwrite it"
        val_acc = data.val_acc if isinstance(data.val_acc, int | float) else None
        raise RunAlreadyComplete(
            f"{record} records a complete run: this launch would {what}. To train on in place, resume with a "
            f"higher trainer.max_epochs (now {max_epochs}; the record is kept as metrics.segment-N.json); to "
            "train on elsewhere, give the new run its own dir (ckpt_path=<its checkpoint> hydra.run.dir=<new "
            "dir>); to repeat the run, launch it without ckpt_path and hydra.run.dir (a new dir).",
            val_acc,
        )
