"""`GradFidelityMonitor`: how far the sampled training gradient lies from the exact one of the same batch."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor

from vitcrs.crs import uninjected
from vitcrs.errors import ConfigError, check_int
from vitcrs.models.fidelity import grad_fidelity, measured_parameters
from vitcrs.record import RunRecord

REL_ERR, COS = "fidelity/rel_err", "fidelity/cos"


class GradFidelityMonitor(Callback):
    """Every `every_n_steps` optimizer steps (steps 0, n, 2n, ...; 0: never), after backward and before the
    optimizer step (and before gradient clipping), computes the exact gradient of the same batch and logs
    `fidelity/rel_err` = ‖ĝ − g‖² / ‖g‖² and `fidelity/cos` (`vitcrs.models.fidelity.grad_fidelity`: every
    parameter but the classifier head) to every logger at that step. metrics.json gets their run means
    (`fidelity_rel_err`, `fidelity_cos`; null when nothing was measured).

    - The exact gradient comes from the same micro-batches the step accumulated (gradient accumulation: each
      loss divided by accumulate_grad_batches, as Lightning does), run again through the plain network
      (`vitcrs.crs.uninjected`) in the training precision, with torch's RNG as it was when each micro-batch
      started (the same dropout masks), via `torch.autograd.grad`: the sampled gradients in `.grad`, which
      the optimizer then uses, are never touched.
    - Data parallel (DDP): `.grad` already holds the mean over ranks of their sampled gradients, so each
      rank's exact gradient is all-reduced (mean) the same way, and both sides are the gradient of the global
      batch. That is one all-reduce of the measured parameters' size, issued by every rank at the same
      steps; every rank computes and logs the same figures. Sharded strategies (FSDP) are refused.
    Costs one extra forward + backward per measured step.
    """

    def __init__(self, every_n_steps: int = 0) -> None:
        self.every_n_steps = check_int("callbacks.grad_fidelity.every_n_steps", every_n_steps, 0, example=50)
        self._step: int | None = None  # the optimizer step whose micro-batches are kept
        self._batches: list[tuple[Any, dict[str, Tensor]]] = []
        self._sums = {REL_ERR: 0.0, COS: 0.0}
        self._count = 0
        self._restored: dict[str, Any] | None = None

    def _due(self, trainer: Trainer) -> bool:
        return self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0

    def fill(self, record: RunRecord) -> None:
        """Set the run means of `record` (None when nothing was measured)."""
        mean = {k: v / self._count if self._count else None for k, v in self._sums.items()}
        record.fidelity_rel_err, record.fidelity_cos = mean[REL_ERR], mean[COS]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if self.every_n_steps and not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ConfigError(
                f"callbacks.grad_fidelity.every_n_steps={self.every_n_steps} works with one device or DDP, "
                f"not with {type(strategy).__name__} (sharded parameters): set "
                "callbacks.grad_fidelity.every_n_steps=0, or measure with python -m vitcrs.fidelity."
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._restored is not None:  # resuming: carry the earlier segments' sums on
            state, self._restored = self._restored, None
            self._sums, self._count = dict(state["sums"]), int(state["count"])

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._due(trainer):
            return
        if self._step != trainer.global_step:
            self._step, self._batches = trainer.global_step, []
        rng = {"cpu": torch.get_rng_state()}
        if pl_module.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(pl_module.device)
        self._batches.append((batch, rng))

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._due(trainer) or self._step != trainer.global_step or not self._batches:
            return
        net = getattr(pl_module, "net", pl_module)
        params = [p for _, p in measured_parameters(net)]
        exact = self._exact_gradients(trainer, pl_module, net, params)
        self._batches, self._step = [], None
        rel_err, cos = grad_fidelity([p.grad for p in params], exact)
        metrics = {REL_ERR: rel_err, COS: cos}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if math.isfinite(rel_err) and math.isfinite(cos):  # a non-finite step is stopped by the module
            self._sums = {k: self._sums[k] + v for k, v in metrics.items()}
            self._count += 1

    def _exact_gradients(
        self, trainer: Trainer, pl_module: LightningModule, net: torch.nn.Module, params: list[Tensor]
    ) -> list[Tensor]:
        """The exact gradient of the kept micro-batches (mean over ranks), per parameter."""
        device = pl_module.device
        cuda = [device] if device.type == "cuda" else []
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # fp16: scale so nothing underflows
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        with torch.random.fork_rng(devices=cuda), torch.enable_grad(), uninjected(net):
            for batch, rng in self._batches:
                torch.set_rng_state(rng["cpu"])
                if "cuda" in rng:
                    torch.cuda.set_rng_state(rng["cuda"], device)
                with trainer.precision_plugin.forward_context():
                    loss = pl_module.loss(batch)[0] / trainer.accumulate_grad_batches
                grads = torch.autograd.grad(loss * scale, params, allow_unused=True)
                for t, g in zip(total, grads, strict=True):
                    if g is not None:
                        t.add_(g.float(), alpha=1.0 / scale)
        flat = torch.cat([t.reshape(-1) for t in total])
        flat = trainer.strategy.reduce(flat, reduce_op="mean")  # identity on one process
        return [
            piece.view_as(p).to(p.dtype)
            for piece, p in zip(flat.split([p.numel() for p in params]), params, strict=True)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self._sums), "count": self._count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied at fit start only: `trainer.test(ckpt_path=...)` loads callback states too.
        self._restored = dict(state_dict)
