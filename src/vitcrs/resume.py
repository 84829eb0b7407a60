"""Resuming a run: checkpoint resolution (`ckpt_path=last`, a checkpoint's run dir) and checkpoint checks.

The training data's position is the data module's checkpoint state (`vitcrs.data.train_loader`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

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


def check_checkpoint(
    ckpt_path: str, num_classes: int, dataset: str, shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, Any]:
    """ConfigError unless `ckpt_path` is a readable vitcrs checkpoint with a `num_classes`-way classifier and,
    given `shapes` (the network's weight shapes, see `vitcrs.models.parameter_shapes`), that architecture.

    Reads only the checkpoint's metadata (memory-mapped; tensors are not loaded). Returns its hyperparameters.
    """
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # a truncated or foreign file: pickle, zip or torch errors
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} cannot be read as a checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Give a checkpoint written by vitcrs, e.g. "
            "<run dir>/checkpoints/last.ckpt, or ckpt_path=null to start afresh."
        ) from err
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
    return hparams


def checkpoint_epochs(ckpt_path: str) -> int:
    """Training epochs done in the run that saved `ckpt_path` (its metrics record's count, else its epoch)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    state = ckpt.get("callbacks", {}).get("MetricsFile", {}) if isinstance(ckpt, dict) else {}
    epochs = state.get("epochs") if isinstance(state, dict) else None
    return int(epochs) if isinstance(epochs, int) else int(ckpt.get("epoch", 0))
