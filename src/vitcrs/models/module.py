"""`ViTClassifier`: the LightningModule fine-tuning a Hugging Face ViT with CRS-sampled backward passes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy
from transformers import get_linear_schedule_with_warmup

from vitcrs.crs import DEFAULT_TARGETS, CRSConfig, crs_state_dict, inject, load_crs_state_dict
from vitcrs.crs import random as crs_random

from .vit import build_vit

Batch = tuple[Tensor, Tensor]


class ViTClassifier(LightningModule):
    """Image classification with a HF `ViTForImageClassification` (`self.net`) whose backward is CRS-sampled.

    model: the `model` config node: name_or_path, attn_implementation, config (see `build_vit`).
    crs: the `crs` config node: ratio, method, targets, min_k, prob, grad_ema (see `CRSConfig`, `inject`).
    optim: lr, weight_decay (not applied to biases and norm weights), warmup_fraction (of all optimizer steps,
        linear warm-up then linear decay to 0).
    num_labels, class_names: the classifier head.

    Logs train/loss (per step and epoch), train/acc (per epoch), val/loss, val/acc, test/loss, test/acc
    (top-1). Checkpoints also hold the CRS running gradient-norm estimates and the CRS random stream, so a
    resumed run samples as an unbroken one.
    A non-finite training loss raises FloatingPointError.
    """

    def __init__(
        self,
        model: dict[str, Any],
        crs: dict[str, Any],
        optim: dict[str, Any],
        num_labels: int,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        crs = dict(crs)
        targets = tuple(crs.pop("targets", DEFAULT_TARGETS))
        self.crs_config = CRSConfig(**crs)
        self.net = build_vit(
            model.get("name_or_path"),
            num_labels,
            model.get("attn_implementation", "eager"),
            model.get("config"),
            class_names,
        )
        inject(self.net, self.crs_config, targets)
        self.net.train()  # from_pretrained returns eval mode, which Lightning would keep for training
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_labels, average="micro") for _ in range(3)
        )

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Logits [B, num_labels] for normalised images [B, 3, S, S]."""
        return self.net(pixel_values=pixel_values).logits

    def _loss(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits, y

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, logits, y = self._loss(batch)
        if not torch.isfinite(loss):
            lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else float("nan")
            raise FloatingPointError(
                f"training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step} "
                f"(lr {lr:.3g}): stopping. Lower optim.lr, train in trainer.precision=32-true, set "
                "trainer.gradient_clip_val, or sample less (a higher crs.ratio or crs.min_k)."
            )
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        loss, logits, y = self._loss(batch)
        self.val_acc(logits, y)
        self.log("val/loss", loss)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        loss, logits, y = self._loss(batch)
        self.test_acc(logits, y)
        self.log("test/loss", loss)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.hparams.optim
        params = [p for p in self.net.parameters() if p.requires_grad]
        groups = [
            {
                "name": "decay",
                "params": [p for p in params if p.ndim >= 2],
                "weight_decay": optim["weight_decay"],
            },
            {"name": "no_decay", "params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=optim["lr"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = round(optim["warmup_fraction"] * total)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["crs"] = {"grad_norms": crs_state_dict(self.net), "rng": crs_random.get_rng_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("crs")
        if state is not None:
            load_crs_state_dict(self.net, state["grad_norms"])
            crs_random.set_rng_state(state["rng"])

    def on_train_start(self) -> None:
        # Estimates restored from a checkpoint may sit on another device than the model now does.
        state = crs_state_dict(self.net)
        moved = {
            name: {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in s.items()}
            for name, s in state.items()
        }
        load_crs_state_dict(self.net, moved)
