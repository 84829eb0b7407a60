"""Train, select and test one run: `python -m vitcrs.train [key=value ...]`; `-m` sweeps (one run per job).

1. `validate`: the composed config becomes checked, typed settings (`vitcrs.settings.RunSettings`; a
   ConfigError names the key) before anything is loaded or written, and the checkpoint to resume from is
   checked against them; only the model's config.json (a Hub id's) may be fetched for that;
2. fit with AdamW (checkpointing last.ckpt and the best val/acc), then test the best checkpoint;
3. `<run_dir>/metrics.json` is kept current throughout by `MetricsFile` (rank 0).
Data parallel (`trainer=ddp`, `trainer=fsdp`): Lightning starts the other processes of a single run by running
this command again in the same run dir; in a `-m` sweep the processes must come from the cluster (SLURM).
Returns the best validation accuracy, for Hydra sweepers.
"""

from __future__ import annotations

import logging
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch import seed_everything
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from vitcrs.callbacks import CheckpointOnSigterm, MetricsFile, describe_run, record_refusal
from vitcrs.conf import CONF_DIR, check_overrides, choice, multirun, plain, register, select
from vitcrs.errors import ConfigError
from vitcrs.models import ViTClassifier
from vitcrs.record import METRICS_FILE
from vitcrs.resume import check_resume, check_resumed_settings, run_settings
from vitcrs.run_dir import (
    RunAlreadyComplete,
    RunDirInUse,
    RunDirLock,
    check_run_dir,
    last_checkpoint,
    resolve_ckpt_path,
)
from vitcrs.settings import RunSettings
from vitcrs.trainer import quiet_known_warnings

# conf/ needs its resolvers and the crs defaults node before Hydra composes it: here, and in every launcher
# worker (joblib, submitit) that imports this module to unpickle `main`.
register()
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preflight:
    """What `validate` found: the run's checked settings, the checkpoint to resume from (None: a fresh start),
    the crs settings it had where they differ (allowed by allow_crs_change=true) and its settings that the
    resumed run must share (`vitcrs.resume.checkpoint_settings`, compared once the trainer is built)."""

    settings: RunSettings
    ckpt_path: str | None
    crs_before_resume: dict[str, Any]
    ckpt_settings: dict[str, Any]


def validate(cfg: DictConfig) -> Preflight:
    """Check every setting without loading weights or data (ConfigError); nothing is written."""
    check_overrides(cfg)
    settings = RunSettings.check(plain(cfg), choice("model"))
    ckpt_path = resolve_ckpt_path(settings.ckpt_path, settings.run_dir)
    resumed = check_resume(ckpt_path, settings) if ckpt_path is not None else None
    check_run_dir(settings.run_dir, resumed.epochs if resumed else None, settings.trainer.max_epochs)
    before, saved = (resumed.crs_before, resumed.settings) if resumed else ({}, {})
    return Preflight(settings, ckpt_path, before, saved)


def train(cfg: DictConfig) -> float | None:
    """One run as configured (cfg.run_dir must resolve); returns the best val accuracy."""
    quiet_known_warnings()
    run = validate(cfg)
    settings = run.settings
    datamodule, run_dir = settings.datamodule, settings.run_dir
    seed_everything(settings.seed, workers=True, verbose=False)
    metrics = MetricsFile(run_dir / METRICS_FILE, describe_run(settings, run.crs_before_resume))
    on_sigterm = CheckpointOnSigterm(last_checkpoint(run_dir))  # before metrics: see its docstring
    trainer, loggers = settings.trainer.build([on_sigterm, metrics], sweep=multirun())
    # What must match a resumed checkpoint: checked now that the trainer (precision, processes) is known,
    # still before anything is written; kept in this run's checkpoints for the next resume.
    metrics.resume_settings = run_settings(settings, trainer)
    if run.ckpt_path is not None:
        check_resumed_settings(run.ckpt_path, run.ckpt_settings, metrics.resume_settings)
    metrics.attach(trainer)
    # One run per run dir, from its first write on: rank 0 holds the lock until it returns (the other ranks
    # write nothing themselves).
    lock = RunDirLock(run_dir) if trainer.global_rank == 0 else None
    if run.ckpt_path is None:
        # Every check passed: from here on a crash, or a kill while the model loads, leaves a marked record.
        # (A resumed run keeps its earlier record until the checkpoint's figures are restored at fit start.)
        metrics.write("incomplete")
    else:
        if Path(run.ckpt_path).resolve().parent.parent != run_dir.resolve():
            log.warning(
                "resuming from %s in a new run dir %s: checkpoint selection starts afresh. To continue the "
                "run in place, give a checkpoint under <run dir>/checkpoints/ (its run dir is then used) or "
                "add hydra.run.dir=<the run dir of the checkpoint>.",
                run.ckpt_path,
                run_dir,
            )
        if trainer.is_global_zero:
            metrics.keep_earlier_segment(loggers)  # a complete run trained on: its record is kept beside
        # Resuming in place: the checkpoint dir is expected to hold the earlier checkpoints.
        warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty")
    try:
        model = ViTClassifier(
            model=settings.model,
            crs=settings.crs,
            optim=settings.optim,
            num_labels=datamodule.num_classes,
            class_names=list(datamodule.class_names),
            seed=settings.seed,
            image_size=datamodule.image_size,
        )
        # weights_only: checkpoints are unpickled by torch's weights-only unpickler, never run (vitcrs.resume)
        trainer.fit(model, datamodule=datamodule, ckpt_path=run.ckpt_path, weights_only=True)
        # The checkpoint callback that selects on a metric (step_checkpoint only keeps last.ckpt).
        selector = next((cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None)), None)
        best = selector.best_model_path if selector is not None else ""
        if not best:
            log.warning("no best checkpoint was saved: testing the final weights")
        results = trainer.test(
            model, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True
        )
        score = selector.best_model_score if best else None  # of the checkpoint just tested
        metrics.finish(
            test_acc=float(results[0]["test/acc"]),
            val_acc=float(score) if score is not None else None,
            sample_cache=model.sample_cache_summary(),
        )
    except BaseException as err:
        metrics.fail(err)
        raise
    finally:
        if lock is not None:
            lock.release()
    if trainer.is_global_zero:
        record = metrics.record
        val = f"{record.val_acc:.4f}" if record.val_acc is not None else "n/a"
        log.info("val_acc %s, test_acc %.4f; metrics in %s", val, record.test_acc, metrics.path)
        log.info("memory: %s", record.memory_summary())
    return metrics.record.val_acc


def record_refused_job(cfg: DictConfig, err: ConfigError) -> None:
    """A sweep job refused before training: its "failed" metrics.json, with what its config says (raw)."""
    run_dir = select(cfg, "run_dir")
    if run_dir is not None:
        fields = {
            "dataset": "data.name",
            "ratio": "crs.ratio",
            "method": "crs.method",
            "targets": "crs.targets",
        }
        record_refusal(
            run_dir, err, seed=select(cfg, "seed"), **{f: select(cfg, k) for f, k in fields.items()}
        )


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except SIGTERMException:  # Lightning's, once the checkpoint is saved and metrics.json marked interrupted
        log.error(
            "stopped by SIGTERM; to go on, run the same command with ckpt_path=%s",
            last_checkpoint(cfg.run_dir),
        )
        raise SystemExit(128 + signal.SIGTERM) from None  # 143, as a process killed by SIGTERM reports
    except RunAlreadyComplete as err:
        if not multirun():
            log.error("%s", err)
            raise SystemExit(2) from None
        # Resuming a sweep (ckpt_path=last): its finished jobs are left as they are, and not failures.
        log.warning("job %s left as it is: %s", cfg.run_dir, err)
        return err.val_acc
    except (ConfigError, FloatingPointError) as err:
        if multirun():
            if isinstance(err, ConfigError) and not isinstance(err, RunDirInUse):  # not the other run's dir
                record_refused_job(cfg, err)
            raise  # Hydra reports it and goes on with the other jobs
        # A bad setting, or a diverged run: the message says it all, no traceback.
        log.error("%s", err)
        if isinstance(err, FloatingPointError):
            last = last_checkpoint(cfg.run_dir)
            if last.is_file():
                log.error("the last good checkpoint is %s", last)
        raise SystemExit(2 if isinstance(err, ConfigError) else 1) from None


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's: launchers that pickle the task function
    # (joblib, submitit) then refer to vitcrs.train.main by name instead of pickling this module's globals.
    from vitcrs.train import main as _main

    _main()
