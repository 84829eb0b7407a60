"""The Lightning `Trainer` of a run, from the `trainer`, `callbacks` and `logger` config nodes
(`TrainerSettings`): the checks of those settings (ConfigError before anything runs), and the notices a
normal run need not show."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.strategies.launchers.subprocess_script import (
    _SubprocessScriptLauncher as FabricSubprocessLauncher,
)
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from vitcrs.errors import ConfigError, check_int


@dataclass(frozen=True)
class TrainerSettings:
    """The checked `trainer`, `callbacks` and `logger` config nodes (plain, as Hydra instantiates them): the
    run's Trainer (`build`) and the figures the other checks and the record read. `check` refuses what would
    train nothing, clip otherwise than recorded, or need a GPU that is not there."""

    trainer: dict[str, Any]
    callbacks: dict[str, Any] = field(default_factory=dict)
    loggers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def check(
        cls,
        trainer: Mapping[str, Any],
        callbacks: Mapping[str, Any] | None = None,
        loggers: Mapping[str, Any] | None = None,
    ) -> TrainerSettings:
        """The settings of these nodes, checked (`check_trainer`); ConfigError naming the key."""
        check_trainer(trainer)
        return cls(dict(trainer), dict(callbacks or {}), dict(loggers or {}))

    @property
    def max_epochs(self) -> int:
        return int(self.trainer["max_epochs"])

    @property
    def precision(self) -> str:
        """trainer.precision as configured (Lightning may run another: see `MetricsFile.attach`)."""
        return str(self.trainer.get("precision"))

    @property
    def processes(self) -> int:
        """The data-parallel processes asked for: trainer.devices (a count or a list) x trainer.num_nodes."""
        devices = self.trainer.get("devices", 1)
        per_node = (
            len(devices) if isinstance(devices, list | tuple) else devices if isinstance(devices, int) else 1
        )
        return per_node * int(self.trainer.get("num_nodes", 1) or 1)

    @property
    def fidelity_every(self) -> Any:
        """callbacks.grad_fidelity.every_n_steps (None without that callback)."""
        return (self.callbacks.get("grad_fidelity") or {}).get("every_n_steps")

    def build(self, extra_callbacks: list[Callback], sweep: bool = False) -> tuple[Trainer, list[Logger]]:
        """The configured callbacks (then `extra_callbacks`), loggers and Trainer; ConfigError for settings
        Lightning refuses and for data-parallel launches that cannot work (`sweep`: a job of a -m sweep)."""
        try:
            callbacks: list[Callback] = _instantiate_all(self.callbacks)
            loggers: list[Logger] = _instantiate_all(self.loggers)
            trainer = instantiate(
                self.trainer, callbacks=[*callbacks, *extra_callbacks], logger=loggers or False
            )
        except (InstantiationException, MisconfigurationException) as err:
            cause = err.__cause__ or err
            if isinstance(cause, ConfigError):  # a check of vitcrs's own (a callback's setting): as it is
                raise ConfigError(str(cause)) from err
            raise ConfigError(
                f"trainer/callbacks/logger settings are refused by Lightning: {type(cause).__name__}: {cause}"
            ) from err
        check_processes(trainer, sweep)
        return trainer, loggers


def check_trainer_length(trainer: Mapping[str, Any]) -> None:
    """ConfigError unless the run trains: trainer.max_epochs >= 1 and some training batches per epoch."""
    check_int("trainer.max_epochs", trainer.get("max_epochs"), 1, example=3)
    limit = trainer.get("limit_train_batches")
    share = isinstance(limit, float) and math.isfinite(limit) and 0 < limit <= 1
    count = isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1
    if limit is not None and not (share or count):
        raise ConfigError(
            f"trainer.limit_train_batches={limit!r} is invalid: it must be null (every batch), an integer "
            ">= 1 (batches per epoch) or a share in (0, 1], e.g. trainer.limit_train_batches=0.25; a run "
            "that trains on nothing would be recorded as trained."
        )


def check_trainer(trainer: Mapping[str, Any]) -> None:
    """ConfigError for trainer settings that would train nothing (`check_trainer_length`), that Lightning
    would take to mean something else than the record says (a gradient_clip_val <= 0 turns clipping off), or
    that cannot run here (a GPU accelerator without a GPU): each names the key and the fix."""
    check_trainer_length(trainer)
    clip = trainer.get("gradient_clip_val")
    number = isinstance(clip, int | float) and not isinstance(clip, bool)
    if clip is not None and not (number and math.isfinite(clip) and clip > 0):
        raise ConfigError(
            f"trainer.gradient_clip_val={clip!r} is invalid: it must be a number > 0 (the largest gradient "
            "norm kept) or null (no clipping); Lightning would take it to mean no clipping. Fix: e.g. "
            "trainer.gradient_clip_val=1.0, or trainer.gradient_clip_val=null to train without clipping."
        )
    accelerator = trainer.get("accelerator")
    mps = getattr(torch.backends, "mps", None)
    gpu = torch.cuda.is_available() or (accelerator == "gpu" and mps is not None and mps.is_available())
    if accelerator in ("gpu", "cuda") and not gpu:
        raise ConfigError(
            f"trainer.accelerator={accelerator!r}: torch sees no GPU here (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}). Fix: trainer.accelerator=cpu (or auto, which takes "
            "a GPU when there is one), e.g. trainer=cpu; for a GPU, run on a machine with one and a CUDA "
            "build of torch."
        )


def _instantiate_all(node: Mapping[str, Any]) -> list[Any]:
    """Instantiate each non-null entry of a name -> config mapping, in order."""
    return [instantiate(c) for c in node.values() if c is not None]


def check_processes(trainer: Trainer, sweep: bool = False) -> None:
    """ConfigError for data-parallel launches that cannot work: spawned processes, and extra processes in a
    job of a -m sweep (`sweep`), which Lightning would start by re-running the whole sweep."""
    strategy = trainer.strategy
    launcher = getattr(strategy, "launcher", None)
    env = getattr(strategy, "cluster_environment", None)
    if launcher is None or trainer.world_size == 1 or (env is not None and env.creates_processes_externally):
        return
    if not isinstance(launcher, (_SubprocessScriptLauncher, FabricSubprocessLauncher)):
        raise ConfigError(
            f"trainer.strategy starts its {trainer.world_size} processes with {type(launcher).__name__}, "
            "which vitcrs does not support: use trainer=ddp or trainer=fsdp (they run the command again per "
            "device)."
        )
    if sweep:
        raise ConfigError(
            f"trainer.devices x trainer.num_nodes = {trainer.world_size} processes in a -m sweep: Lightning "
            "would start each extra process by re-running the whole sweep. Run data-parallel sweeps with "
            "hydra/launcher=slurm (SLURM starts one task per device), or run each job on its own (no -m)."
        )


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


_DROP_LITLOGGER_TIP = _DropLitLoggerTip()  # one instance: addFilter skips it when already added


def quiet_known_warnings() -> None:
    """Silence the notices a normal run triggers that need no action; nothing else."""
    # Lightning suggests more dataloader workers whenever num_workers is small; data.num_workers is explicit.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # Quick runs (few batches per epoch) are told the logging interval exceeds an epoch.
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval.*")
    # Lightning 2.6 still uses torch's deprecated pytree LeafSpec (torch >= 2.10); harmless.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    # Lightning's model summary cannot size bf16/fp16 weights and says so on every mixed-precision run.
    warnings.filterwarnings("ignore", message=r".*is not supported by the model summary.*")
    # Lightning's advertisement for its cloud logger, printed by every Trainer.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DROP_LITLOGGER_TIP)
