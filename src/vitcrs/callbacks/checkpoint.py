"""`RunDirCheckpoint`: Lightning's ModelCheckpoint, whose saved selection follows a run dir that has moved."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

_PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")


class RunDirCheckpoint(ModelCheckpoint):
    """A `ModelCheckpoint` (same arguments, same checkpoint state) for checkpoints kept in the run dir.

    Its state in a checkpoint names files by absolute path (best_model_path, best_k_models, ...). When a run
    resumes in place from one of its own checkpoints after its run dir was moved or copied, those paths are
    re-rooted from the saved `dirpath` to this one's, so selection goes on with the run's own files (plain
    ModelCheckpoint keeps only best_model_path, pointing at the old location, and tests that file). Resuming
    into another run dir leaves the state as Lightning does.

    The files it deletes (a former best or last checkpoint) must lie in its checkpoint dir once resolved: the
    paths come from a checkpoint's state, which someone else may have written (`<dir>/../..` passes
    Lightning's own test).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ckpt_path: str | None = None

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key: checkpoints written by either class restore into the other.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        self._ckpt_path = trainer.ckpt_path  # Lightning calls this just before load_state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old, new = state_dict.get("dirpath"), self.dirpath
        resumed_here = self._ckpt_path is not None and new is not None
        if resumed_here:
            resumed_here = Path(self._ckpt_path).resolve().parent == Path(new).resolve()
        if old and new and old != new and resumed_here:
            state_dict = _rerooted(state_dict, old, new)
        super().load_state_dict(state_dict)

    def _should_remove_checkpoint(self, trainer: Trainer, previous: str, current: str) -> bool:
        if not super()._should_remove_checkpoint(trainer, previous, current) or self.dirpath is None:
            return False
        return Path(self.dirpath).resolve() in Path(previous).resolve().parents


def _rerooted(state: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """`state` with every path under directory `old` moved under `new`."""

    def move(path: Any) -> Any:
        if isinstance(path, str) and path.startswith(old.rstrip(os.sep) + os.sep):
            return os.path.join(new, os.path.relpath(path, old))
        return path

    out = {**state, "dirpath": new}
    for key in _PATH_KEYS:
        if key in out:
            out[key] = move(out[key])
    if isinstance(out.get("best_k_models"), dict):
        out["best_k_models"] = {move(k): v for k, v in out["best_k_models"].items()}
    return out
