"""Train, select and test one run: `python -m vitcrs.train [key=value ...]`; `-m` sweeps (one run per job).

1. `validate`: every setting is checked by the object that owns it (ConfigError naming the key) before
   anything is downloaded, loaded or written, including the checkpoint to resume from;
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
from hydra.utils import instantiate
from lightning.pytorch import seed_everything
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from vitcrs.callbacks import CheckpointOnSigterm, MetricsFile, describe_run, record_config_failure
from vitcrs.conf import CONF_DIR, check_overrides, container, multirun
from vitcrs.crs import CRSConfig
from vitcrs.data import VisionDataModule
from vitcrs.errors import ConfigError
from vitcrs.models import ModelFamily, OptimConfig, ViTClassifier, check_architecture, model_family
from vitcrs.record import METRICS_FILE
from vitcrs.resume import (
    check_resume,
    check_resumed_settings,
    last_checkpoint,
    resolve_ckpt_path,
    run_settings,
)
from vitcrs.run_dir import RunAlreadyComplete, RunDirInUse, RunDirLock, check_run_dir
from vitcrs.trainer import build_trainer, check_trainer, quiet_known_warnings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preflight:
    """What `validate` found and built: the (unprepared) data module, the sampling settings in effect and the
    optimiser settings, the checkpoint to resume from (None: a fresh start), the crs settings it had where
    they differ (allowed by allow_crs_change=true) and its settings that the resumed run must share
    (`vitcrs.resume.checkpoint_settings`, compared once the trainer is built)."""

    datamodule: VisionDataModule
    crs: CRSConfig
    optim: OptimConfig
    ckpt_path: str | None
    crs_before_resume: dict[str, Any]
    ckpt_settings: dict[str, Any]


def build_datamodule(
    cfg: DictConfig, batch_indices: bool = False, family: ModelFamily | None = None
) -> VisionDataModule:
    """The checked (unprepared) data module of `cfg.data` for `cfg.model`: a null data.image_size / mean /
    std is the model's own (its family's `inputs`, read from small files only). batch_indices: training
    batches carry the images' dataset indices (crs.prob=sample_cache). family: `cfg.model`'s, if already
    checked. Raises ConfigError."""
    if "batch_indices" in cfg.data:
        raise ConfigError(
            "data.batch_indices is set by vitcrs itself (true with crs.prob=sample_cache, whose cache needs "
            "each training image's dataset index): drop the +data.batch_indices override."
        )
    model = container(cfg.model)
    inputs = (family or model_family(model)).inputs(model)
    size, mean, std = (cfg.data.get(k) for k in ("image_size", "mean", "std"))
    if size is not None:
        inputs.check_image_size(size)
    datamodule = instantiate(
        cfg.data,
        _convert_="all",
        image_size=size if size is not None else inputs.image_size,
        mean=mean if mean is not None else list(inputs.mean),
        std=std if std is not None else list(inputs.std),
        batch_indices=batch_indices,
    )
    return datamodule.check()


def validate(cfg: DictConfig) -> Preflight:
    """Check every setting without loading weights or data (ConfigError); nothing is written."""
    check_overrides(cfg)
    model = container(cfg.model)
    family = model_family(model)
    # the settings in effect: those that change nothing at their defaults (`CRSConfig.in_effect`), so the
    # model, its checkpoints and the record say what runs
    crs = CRSConfig.from_settings(container(cfg.crs), model.get("attn_implementation")).in_effect()
    optim = OptimConfig.from_settings(container(cfg.optim))
    check_trainer(cfg.trainer)
    trainer, fidelity = cfg.trainer, OmegaConf.select(cfg, "callbacks.grad_fidelity.every_n_steps")
    devices = trainer.get("devices", 1)
    processes = len(devices) if OmegaConf.is_list(devices) else devices if isinstance(devices, int) else 1
    optim.check_in_backward(
        trainer.get("accumulate_grad_batches"), trainer.get("gradient_clip_val"), trainer.get("precision"),
        processes * int(trainer.get("num_nodes", 1) or 1), fidelity,
    )  # fmt: skip
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.run_dir)
    datamodule = build_datamodule(cfg, batch_indices=crs.prob == "sample_cache", family=family)
    arch = family.meta_architecture(model, datamodule.num_classes)
    check_architecture(arch, datamodule.image_size)
    crs.check_sampled(arch, datamodule.image_size, datamodule.batch_size)
    resumed = None
    if ckpt_path is not None:
        resumed = check_resume(
            ckpt_path, datamodule, arch.parameter_shapes, crs.to_dict(), bool(cfg.allow_crs_change)
        )
    check_run_dir(cfg.run_dir, resumed.epochs if resumed else None, cfg.trainer.max_epochs)
    before, settings = (resumed.crs_before, resumed.settings) if resumed else ({}, {})
    return Preflight(datamodule, crs, optim, ckpt_path, before, settings)


def train(cfg: DictConfig) -> float | None:
    """One run as configured (cfg.run_dir must resolve); returns the best val accuracy."""
    quiet_known_warnings()
    run = validate(cfg)
    datamodule, run_dir = run.datamodule, Path(cfg.run_dir)
    seed_everything(cfg.seed, workers=True, verbose=False)
    record = describe_run(cfg, datamodule, run.crs_before_resume, run.crs)
    metrics = MetricsFile(run_dir / METRICS_FILE, record)
    on_sigterm = CheckpointOnSigterm(last_checkpoint(run_dir))  # before metrics: see its docstring
    trainer, loggers = build_trainer(cfg, [on_sigterm, metrics])
    # What must match a resumed checkpoint: checked now that the trainer (precision, processes) is known,
    # still before anything is written; kept in this run's checkpoints for the next resume.
    metrics.resume_settings = run_settings(cfg, datamodule, run.optim, trainer)
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
            model=container(cfg.model),
            crs=run.crs,
            optim=run.optim,
            num_labels=datamodule.num_classes,
            class_names=list(datamodule.class_names),
            seed=cfg.seed,
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
                record_config_failure(cfg, err)
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
