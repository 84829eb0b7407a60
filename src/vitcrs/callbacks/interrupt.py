"""`CheckpointOnSigterm`: a run stopped by SIGTERM leaves a checkpoint of the point where it stopped."""

from __future__ import annotations

import os

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException


class CheckpointOnSigterm(Callback):
    """Saves the training state to `path` (the run's last.ckpt) when fitting stops on SIGTERM.

    Lightning's own handler catches SIGTERM (SLURM preemption, `timeout`, `docker stop`), lets the batch in
    progress finish (with several processes, every rank at the same batch) and raises SIGTERMException; its
    `on_exception` hooks then run here, on every rank, before the loop state is torn down. The checkpoint is
    the one a step checkpoint after that batch would be, so the resumed run goes on from there. Must come
    before MetricsFile among the callbacks, so that the record is marked once the checkpoint is written.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if isinstance(exception, SIGTERMException) and fitting:
            trainer.save_checkpoint(self.path)
