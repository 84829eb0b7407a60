"""`FaultInjector`: make a run fail on purpose at a given step, to check what a failure leaves behind.

A test-only callback: training subprocesses of the tests import it from here (`quiet_env` puts tests/ on
their PYTHONPATH), added with `FAULT` and its settings, e.g. `[FAULT, "+callbacks.fault.kill_at_step=6"]`.
"""

from __future__ import annotations

import math
import os
import signal
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

FAULT = "+callbacks.fault._target_=support.faults.FaultInjector"  # the override that adds it to a run


class FaultInjector(Callback):
    """Breaks a training run at a chosen optimizer step (the tests of resumption and of the NaN guard use it).

    kill_at_step: when training batch `kill_at_step` starts (that many optimizer steps done), the process
        kills itself with SIGKILL, as the OOM killer or a preempting scheduler would: no handler, no cleanup.
    term_at_step: when that batch starts, the process sends itself SIGTERM, as a scheduler stopping a job
        (SLURM preemption, `timeout`, `docker stop`) would.
    kill_at_test: SIGKILL when the test split starts (training and checkpoint selection done).
    nan_at_step: the images of that batch become NaN, so its loss is NaN.
    nan_on_rank: with several processes, only this rank's batch becomes NaN; None: every rank's.
    Added to a run with `FAULT` `+callbacks.fault.kill_at_step=N`.
    """

    def __init__(
        self,
        kill_at_step: int | None = None,
        nan_at_step: int | None = None,
        nan_on_rank: int | None = None,
        term_at_step: int | None = None,
        kill_at_test: bool = False,
    ) -> None:
        self.kill_at_test = kill_at_test
        self.kill_at_step = kill_at_step
        self.term_at_step = term_at_step
        self.nan_at_step = nan_at_step
        self.nan_on_rank = nan_on_rank

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if trainer.global_step == self.term_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        if trainer.global_step == self.nan_at_step and self.nan_on_rank in (None, trainer.global_rank):
            batch[0].fill_(math.nan)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.kill_at_test:
            os.kill(os.getpid(), signal.SIGKILL)
