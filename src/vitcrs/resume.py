"""Resuming a run: reading a checkpoint safely, and what it must share with the run that resumes it.

The training data's position is the data module's checkpoint state (`vitcrs.data.train_loader`).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer

from vitcrs.crs import CRSConfig
from vitcrs.errors import ConfigError
from vitcrs.record import KEY
from vitcrs.settings import RunSettings

log = logging.getLogger(__name__)


def unsafe_globals(path: str, err: Exception) -> list[str]:
    """The Python objects (module.name) the pickle of checkpoint `path` names beyond what torch's weights-only
    unpickler admits: read from the file's opcodes (nothing is run), else from torch's error `err`."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: what the unpickler's error names
        found = []
    return found or re.findall(r"GLOBAL (\S+) was not an allowed global", str(err))


def load_checkpoint(ckpt_path: str) -> dict[str, Any]:
    """The checkpoint at `ckpt_path`, unpickled by torch's weights-only unpickler (memory-mapped: tensors are
    not read). ConfigError naming the file for one that cannot be read, and for one whose pickle names any
    other Python object (a class or function, which unpickling would call: a file that runs code): that
    file is refused, and the message names the file and what it holds.

    A vitcrs checkpoint holds only what that unpickler admits by default (dicts, lists, strings, numbers,
    tensors, torch's RNG states): no type needs allow-listing (`tests/test_trust.py` checks a checkpoint of
    every CRS state kind), so anything else is refused. Lightning's own load (`trainer.fit`/`trainer.test`
    with `weights_only=True`) uses the same unpickler.
    """
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        found = unsafe_globals(ckpt_path, err)
        if found:
            raise ConfigError(
                f"ckpt_path={ckpt_path!r} was not loaded: its pickle holds {', '.join(found)}, which no "
                "vitcrs checkpoint holds, and unpickling it could run code from the file. Give a checkpoint "
                "written by vitcrs.train that you trust (e.g. <run dir>/checkpoints/last.ckpt), or "
                "ckpt_path=null to start afresh."
            ) from None
        raise _unreadable(ckpt_path, err) from err
    except Exception as err:  # a truncated or foreign file: zip or torch errors
        raise _unreadable(ckpt_path, err) from err
    return ckpt


def _unreadable(ckpt_path: str, err: Exception) -> ConfigError:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    line = next((ln for ln in lines if ln.startswith("WeightsUnpickler error")), lines[0] if lines else "")
    return ConfigError(
        f"ckpt_path={ckpt_path!r} cannot be read as a checkpoint ({type(err).__name__}: {line}). Give a "
        "checkpoint written by vitcrs, e.g. <run dir>/checkpoints/last.ckpt, or ckpt_path=null to start "
        "afresh."
    )


def check_checkpoint(
    ckpt_path: str, num_classes: int, dataset: str, shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, Any]:
    """ConfigError unless `ckpt_path` is a readable vitcrs checkpoint with a `num_classes`-way classifier and,
    given `shapes` (the network's weight shapes, see `vitcrs.models.parameter_shapes`), that architecture.

    Reads only the checkpoint's metadata (`load_checkpoint`: weights-only, memory-mapped). Returns the
    checkpoint.
    """
    if not isinstance(ckpt_path, str) or not Path(ckpt_path).is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path!r}: no such checkpoint file. Give a run's checkpoint, e.g. "
            "ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt, ckpt_path=last (with "
            "hydra.run.dir=<the run dir>), or ckpt_path=null to start afresh."
        )
    ckpt = load_checkpoint(ckpt_path)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    labels = hparams.get("num_labels") if isinstance(hparams, dict) else None
    if not isinstance(labels, int) or "state_dict" not in ckpt:
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} is not a vitcrs training checkpoint (no state_dict / num_labels). Give "
            "one written by vitcrs.train, e.g. <run dir>/checkpoints/last.ckpt, or ckpt_path=null."
        )
    if labels != num_classes:
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} holds a {labels}-class classifier, but dataset {dataset!r} has "
            f"{num_classes} classes: resume with the dataset the checkpoint was trained on (and its other "
            "settings), or start afresh with ckpt_path=null."
        )
    if shapes is not None:
        saved = {
            k.removeprefix("net."): tuple(v.shape)
            for k, v in ckpt["state_dict"].items()
            if k.startswith("net.")
        }
        differ = sorted(k for k in saved.keys() | shapes.keys() if saved.get(k) != shapes.get(k))
        if differ:
            k = differ[0]
            raise ConfigError(
                f"ckpt_path={ckpt_path!r} holds another architecture than model.* gives: {len(differ)} "
                f"weights differ, e.g. {k} has shape {saved.get(k)} in the checkpoint but {shapes.get(k)} in "
                "the model (None: absent). Resume with the model settings the checkpoint was trained with "
                "(model=..., model.config.*), or start afresh with ckpt_path=null."
            )
    return ckpt


def checkpoint_epochs(ckpt: dict[str, Any]) -> int:
    """Training epochs done in the run that saved the checkpoint `ckpt` (its metrics record's count, else its
    epoch)."""
    state = ckpt.get("callbacks", {}).get("MetricsFile", {})
    epochs = state.get(KEY.epochs) if isinstance(state, dict) else None
    return int(epochs) if isinstance(epochs, int) else int(ckpt.get("epoch", 0))


def crs_changes(saved: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, Any]:
    """The crs.* settings `now` (in effect: `CRSConfig.in_effect`) that differ from those of a checkpoint's
    run (`saved`: its hyperparameters): key -> the checkpoint's value. A key the checkpoint's run did not have
    yet took its default there; its settings are compared as in effect too (a setting that changed nothing
    then, e.g. crs.prob with the lean block, is no change)."""
    before = (saved or {}).get("crs")
    if not isinstance(before, dict) or not before:  # not saved: nothing to compare with
        return {}
    before = {**CRSConfig().to_dict(), **before}
    with contextlib.suppress(TypeError, ValueError):  # settings this version cannot take stay as saved
        before = CRSConfig(**before).in_effect().to_dict()
    return {k: before.get(k) for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)}


# The settings a resumed run must share with its checkpoint's run, by config key (its crs.* settings are
# checked by `crs_changes`; trainer.max_epochs may grow, which is how a run trains on). A resumed run trains
# on with the checkpoint's optimizer state, schedule and data position: with another value here it would
# train with a mix of both yet record only the new one.
WORLD_SIZE = "trainer.devices x trainer.num_nodes"
RESUMED_KEYS = (
    "model.attn_implementation",
    "trainer.precision",
    "data.batch_size",
    "trainer.accumulate_grad_batches",
    WORLD_SIZE,
    "optim.lr",
    "optim.weight_decay",
    "optim.warmup_fraction",
    "data.image_size",
    "data.limit_train",
)


def run_settings(settings: RunSettings, trainer: Trainer) -> dict[str, Any]:
    """The RESUMED_KEYS values of a run about to start (`trainer` built): the precision Lightning runs (a
    16-mixed request on a CPU runs bf16-mixed), the world size, the data module's batch and image size."""
    datamodule, optim = settings.datamodule, settings.optim
    return {
        "model.attn_implementation": settings.attn_implementation,
        "trainer.precision": str(trainer.precision),
        "data.batch_size": datamodule.batch_size,
        "trainer.accumulate_grad_batches": trainer.accumulate_grad_batches,
        WORLD_SIZE: trainer.world_size,
        "optim.lr": optim.lr,
        "optim.weight_decay": optim.weight_decay,
        "optim.warmup_fraction": optim.warmup_fraction,
        "data.image_size": datamodule.image_size,
        "data.limit_train": datamodule.limit_train,
    }


def checkpoint_settings(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The RESUMED_KEYS values of a checkpoint's run: kept by its MetricsFile state; from a checkpoint of an
    earlier version, those it shows (optim.* from its hyperparameters, the world size from its per-rank CRS
    states)."""
    state = ckpt.get("callbacks", {}).get("MetricsFile", {})
    saved = state.get(KEY.settings) if isinstance(state, dict) else None
    if isinstance(saved, dict):
        return {k: v for k, v in saved.items() if k in RESUMED_KEYS}
    optim = ckpt.get("hyper_parameters", {}).get("optim")
    found = {f"optim.{k}": v for k, v in optim.items()} if isinstance(optim, dict) else {}
    if isinstance(ckpt.get("crs"), list) and ckpt["crs"]:
        found[WORLD_SIZE] = len(ckpt["crs"])
    return {k: v for k, v in found.items() if k in RESUMED_KEYS}


def check_resumed_settings(ckpt_path: str, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """ConfigError naming the first setting of RESUMED_KEYS that differs between the checkpoint's run
    (`saved`, `checkpoint_settings`; keys it lacks are not compared) and this run (`now`, `run_settings`)."""
    for key in RESUMED_KEYS:
        if key in saved and saved[key] != now.get(key):
            if key == WORLD_SIZE:
                fix = f"resume with {saved[key]} processes (e.g. trainer=ddp trainer.devices={saved[key]})"
            else:
                fix = f"resume with {key}={saved[key]} (the checkpoint's)"
            raise ConfigError(
                f"ckpt_path={ckpt_path!r} was trained with {key} = {saved[key]!r}, this run has "
                f"{now.get(key)!r}: the resumed run would go on with the checkpoint's optimizer state, "
                "schedule and data position but record the new value, so its record would describe neither. "
                f"Fix: {fix}, or train anew (ckpt_path=null, with its own hydra.run.dir)."
            )


@dataclass(frozen=True)
class ResumeCheck:
    """What `check_resume` found: the checkpoint's crs settings where they differ (allowed by
    allow_crs_change), the epochs it has trained, and its RESUMED_KEYS settings (`checkpoint_settings`)."""

    crs_before: dict[str, Any]
    epochs: int
    settings: dict[str, Any]


def check_resume(ckpt_path: str, settings: RunSettings) -> ResumeCheck:
    """ConfigError unless `ckpt_path` resumes the run of `settings`: a vitcrs checkpoint of the same data
    (the data module's classes) and network (its architecture's weight shapes), with the same crs.* settings
    unless allow_crs_change. The settings that need the trainer are compared by `check_resumed_settings`
    once it is built."""
    datamodule, crs = settings.datamodule, settings.crs.to_dict()
    ckpt = check_checkpoint(
        ckpt_path, datamodule.num_classes, datamodule.name, settings.arch.parameter_shapes
    )
    changed = crs_changes(ckpt["hyper_parameters"], crs)
    if changed and not settings.allow_crs_change:
        now = {k: crs.get(k) for k in changed}
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} was trained with other crs settings ({changed}) than this run's "
            f"({now}): the record would describe neither. Resume with the checkpoint's settings, or add "
            "allow_crs_change=true to continue with the new ones (metrics.json then records the old ones "
            "under settings.crs_before_resume)."
        )
    return ResumeCheck(changed, checkpoint_epochs(ckpt), checkpoint_settings(ckpt))
