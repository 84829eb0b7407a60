"""Resuming a run: checkpoint resolution (`ckpt_path=last`, a checkpoint's run dir) and checkpoint checks.

The training data's position is the data module's checkpoint state (`vitcrs.data.train_loader`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from vitcrs.crs import CRSConfig
from vitcrs.errors import ConfigError

log = logging.getLogger(__name__)

LAST = "last"  # ckpt_path=last: <run_dir>/checkpoints/last.ckpt


def last_checkpoint(run_dir: str | Path) -> Path:
    """Where a run keeps its latest checkpoint: <run_dir>/checkpoints/last.ckpt (it may not exist yet)."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str | Path) -> str | None:
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
    tensors, torch's RNG states): no type needs allow-listing (`tests/test_resume.py` checks a checkpoint of
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
    epochs = state.get("epochs") if isinstance(state, dict) else None
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


def check_resume(
    ckpt_path: str,
    datamodule: Any,
    shapes: dict[str, tuple[int, ...]],
    crs: dict[str, Any],
    allow_crs_change: bool,
) -> tuple[dict[str, Any], int]:
    """ConfigError unless `ckpt_path` resumes this run: a vitcrs checkpoint of the same data (`datamodule`'s
    classes) and network (`shapes`), with the same crs.* settings `crs` unless `allow_crs_change`. Returns
    the checkpoint's crs settings where they differ (allowed) and the epochs it has trained."""
    ckpt = check_checkpoint(ckpt_path, datamodule.num_classes, datamodule.name, shapes)
    changed = crs_changes(ckpt["hyper_parameters"], crs)
    if changed and not allow_crs_change:
        now = {k: crs.get(k) for k in changed}
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} was trained with other crs settings ({changed}) than this run's "
            f"({now}): the record would describe neither. Resume with the checkpoint's settings, or add "
            "allow_crs_change=true to continue with the new ones (metrics.json then records the old ones "
            "under settings.crs_before_resume)."
        )
    return changed, checkpoint_epochs(ckpt)
