"""`ViTClassifier`: the LightningModule fine-tuning a ViT (any model family) with CRS-sampled backward
passes."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from vitcrs.crs import (
    MATMUL_TARGETS,
    CRSConfig,
    CRSState,
    attach_sample_cache,
    crs_state,
    grad_norm_sources,
    inject,
    sample_cache_bytes_per_image,
    sample_cache_nbytes,
    sample_caches,
    set_training_batch,
)
from vitcrs.distributed import gather_objects
from vitcrs.units import GIB

from .family import Architecture, ModelFamily
from .optim import AdamWInBackward, OptimConfig
from .registry import model_family

Batch = tuple[Tensor, ...]  # (images, labels); training with prob=sample_cache: (images, labels, indices)
log = logging.getLogger(__name__)


# gradient-norm source names of earlier versions (module path + op) -> today's (block path + op)
_RENAMED_OPS = {
    **{f".attention.{op}": f".{op}" for op in ("qkv", "scores_m", "scores_n", "context_n")},
    ".attention.o_proj": ".attn_output",
    ".mlp.fc1": ".fc1",
    ".mlp.fc2": ".fc2",
}


def _source_name(name: str) -> str:
    """A gradient-norm source's name in a checkpoint, as this version names it."""
    for old, new in _RENAMED_OPS.items():
        if name.endswith(old):
            return name.removesuffix(old) + new
    return name


def _crs_ranks(state: dict | list | None) -> list[dict[str, Any]]:
    """`checkpoint["crs"]`: the per-rank states `on_save_checkpoint` writes, or read from a checkpoint of an
    earlier version (sources named by module path; before that {"grad_norms", "rng", "per_rank"} with
    estimates as {"momentum", "value"})."""
    if not isinstance(state, dict):
        ranks = state or []
        return [{**r, "grad_norm": {_source_name(n): e for n, e in r["grad_norm"].items()}} for r in ranks]
    old = state.get("per_rank") or [state]
    none = torch.empty(0)  # (an estimate before its first update)
    estimates = [
        {n: none if s["value"] is None else s["value"] for n, s in r["grad_norms"].items()} for r in old
    ]
    ranks = [{**r, "grad_norm": e, "generator": r["rng"]} for r, e in zip(old, estimates, strict=True)]
    return _crs_ranks(ranks)


def warn_if_activation_gradients_sampled(crs_config: CRSConfig) -> None:
    """Log one warning (global rank 0) when sampled targets include the attention matmuls."""
    matmuls = [t for t in crs_config.targets if t in MATMUL_TARGETS]
    if not matmuls or crs_config.exact or rank_zero_only.rank != 0:
        return
    log.warning(
        "crs.targets has %s: sampling an attention matmul samples *activation* gradients (of q, k, v), and "
        "their error flows down into every earlier block; sampling a linear's weight gradient (query, key, "
        "value, attn_output, fc1, fc2, mlp) keeps activation gradients exact. Measure what it costs: "
        "`python -m vitcrs.fidelity` with this model and data (error vs the exact gradient and vs minibatch "
        "noise, docs/fidelity.md), or log it while training with callbacks.grad_fidelity.every_n_steps=50.",
        ", ".join(matmuls),
    )


class ViTClassifier(LightningModule):
    """Image classification with a ViT (`self.net`, built by its model family) whose backward is CRS-sampled.

    model: the `model` config node (a plain dict): family (default hf_vit) and the family's keys, e.g.
        name_or_path, attn_implementation, config (`vitcrs.models.registry`, `ModelFamily.build`).
    crs: the sampling settings (`CRSConfig`: ratio, method, targets, ...; `inject`), as checked by the caller
        (`vitcrs.settings.RunSettings`).
    optim: the optimizer settings (`OptimConfig`: lr, weight_decay, warmup_fraction, in_backward).
        Both are saved as plain values (checkpoints, hparams.yaml), and a mapping of their fields, as
        `load_from_checkpoint` passes them back, is read into them.
    num_labels, class_names: the classifier head.

    seed: the run's seed. When fitting starts, the network's sampling stream (`self.crs.generator`, a
        `SamplingGenerator`) is seeded with seed + global rank, so data-parallel ranks draw different rows;
        None: leave the stream as it is.
    image_size: the side of the images it is trained on (None: the model's own): the network is built for it
        (a timm model then interpolates its position embeddings), and the sample cache is sized by it.

    With crs.prob=sample_cache, training batches carry a third element, the images' dataset indices: they are
    handed to the network (`set_training_batch`) before its forward, so the sampled ops read and write the
    per-image gradient-norm cache; it holds a row per training image (`len` of the training loader's
    dataset), per process. Validation and test never touch it.

    Logs train/loss (per step and epoch), train/acc (per epoch), val/loss, val/acc, test/loss, test/acc
    (top-1). Checkpoints also hold `checkpoint["crs"]`, one entry per rank: the running gradient-norm
    estimates by op, the sampling stream, torch's RNG state (dropout) and, with crs.cache_in_checkpoint, the
    sample-cache entries, so a resumed run samples as an unbroken one.
    A non-finite training loss, or non-finite gradients, raise FloatingPointError on every rank before the
    optimizer step: the weights (and so any later checkpoint) never take a non-finite update. Weights made
    non-finite by a step all the same raise it right after the step, before any checkpoint is written.
    """

    def __init__(
        self,
        model: dict[str, Any],
        crs: CRSConfig | Mapping[str, Any],
        optim: OptimConfig | Mapping[str, Any],
        num_labels: int,
        class_names: list[str] | None = None,
        seed: int | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        self.crs_config = crs if isinstance(crs, CRSConfig) else CRSConfig(**crs)
        self.optim_config = optim if isinstance(optim, OptimConfig) else OptimConfig(**optim)
        # Saved as plain values (checkpoints, hparams.yaml; load_from_checkpoint passes them back):
        # save_hyperparameters reads the arguments' current values.
        crs, optim = self.crs_config.to_dict(), asdict(self.optim_config)
        self.save_hyperparameters()
        self.family: ModelFamily = model_family(model)
        self.net = self.family.build(model, num_labels, class_names, image_size)
        inject(self.net, self.crs_config)
        warn_if_activation_gradients_sampled(self.crs_config)
        self._pending_torch_rng: dict[str, Tensor] | None = None  # from a checkpoint, not yet applied
        self._pending_cache: dict[str, Tensor] | None = None  # sample-cache entries from a checkpoint
        self._warned_no_indices = False
        # non-finite losses since the last optimizer step (a device tensor: checking it needs a host sync,
        # done once per step, with the gradients, in on_before_optimizer_step) and the last loss
        self._loss_nonfinite: Tensor | None = None
        self._last_loss: Tensor | None = None
        self.net.train()  # from_pretrained returns eval mode, which Lightning would keep for training
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_labels, average="micro") for _ in range(3)
        )

    @property
    def crs(self) -> CRSState:
        """The network's CRS state (its sampling stream, gradient-norm sources, training batch)."""
        state = crs_state(self.net)
        assert state is not None  # injected in __init__
        return state

    def setup(self, stage: str) -> None:
        # Runs once the rank is known and before a checkpoint is restored (which then replaces the stream).
        if stage == TrainerFn.FITTING and self.hparams.get("seed") is not None:
            self.crs.generator.manual_seed(int(self.hparams.seed) + self.global_rank)
        # each rank keeps its own gradient-norm estimates (the buffers of the CRS state): DDP must not
        # broadcast rank 0's
        prefix = next(name for name, m in self.named_modules() if m is self.crs)
        self._ddp_params_and_buffers_to_ignore = [f"{prefix}.{n}" for n, _ in self.crs.named_buffers()]

    def architecture(self) -> Architecture:
        """The network's widths, depth and tokens per image (`Architecture.tokens`)."""
        return self.family.architecture(self.net)

    def sample_cache_summary(self) -> dict[str, Any] | None:
        """The per-image gradient-norm cache (prob=sample_cache) of this process: format, training images,
        analytic bytes per image and the host bytes its entries take now; None for other probabilities."""
        cfg = self.crs_config
        if cfg.prob != "sample_cache":
            return None
        arch = self.architecture()
        per_image = sample_cache_bytes_per_image(
            arch.tokens(self.hparams.get("image_size")),
            arch.hidden_size,
            arch.num_attention_heads,
            arch.num_hidden_layers,
            self.crs.targets,
            cfg.cache_format,
        )
        images = self.crs.batch.dataset_size
        return {
            "format": cfg.cache_format,
            "images": images,
            "bytes_per_image": per_image,
            "host_bytes": sample_cache_nbytes(self.net),
        }

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Logits [B, num_labels] for normalised images [B, 3, S, S] (any S the model takes: its family's
        `logits`)."""
        return self.family.logits(self.net, pixel_values)

    def loss(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """(mean cross-entropy, logits [B, num_labels], labels [B]) of a batch."""
        x, y = batch[0], batch[1]
        logits = self(x)
        return F.cross_entropy(logits, y), logits, y

    def _any_rank(self, flags: Tensor) -> list[bool]:
        """For each bool in `flags` [n], whether it is true on any rank: one all-reduce, one host sync, and
        every rank gets the same answer."""
        flags = flags.detach().float().reshape(-1)
        if self._trainer is not None:
            flags = self.trainer.strategy.reduce(flags, reduce_op="max")
        return [v > 0 for v in flags.tolist()]

    def _lr(self) -> float:
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        return optimizers[0].param_groups[0]["lr"] if optimizers else float("nan")

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        if self.crs_config.prob == "sample_cache":  # (cleared again in on_train_batch_end, after backward)
            indices = batch[2] if len(batch) > 2 else None
            if indices is None and not self._warned_no_indices:
                self._warned_no_indices = True
                log.warning(
                    "crs.prob=sample_cache: the training batches carry no dataset indices, so the per-image "
                    "cache is not used: rows are drawn with p ∝ ‖x‖ (unbiased)"
                )
            exact = self.crs_config.cache_warmup == "exact" and self.current_epoch == 0
            set_training_batch(self.net, indices, exact)
        loss, logits, y = self.loss(batch)
        # Checked in on_before_optimizer_step, not here: a check here would stall the host before backward.
        nonfinite = ~torch.isfinite(loss.detach())
        prior = self._loss_nonfinite
        self._loss_nonfinite = nonfinite if prior is None else prior | nonfinite
        self._last_loss = loss.detach()
        self.train_acc.update(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        loss, logits, y = self.loss(batch)
        self.val_acc.update(logits, y)
        self.log("val/loss", loss, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        loss, logits, y = self.loss(batch)
        self.test_acc.update(logits, y)
        self.log("test/loss", loss, sync_dist=True)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self) -> dict[str, Any]:
        return self.optim_config.build(self.net.parameters(), self.trainer.estimated_stepping_batches)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # After backward (gradients all-reduced), before clipping and the step: the loss(es) of this step and
        # the gradient norm, checked together in one all-reduce. A GradScaler (16-mixed) handles overflowing
        # gradients itself, by skipping the step; its loss is still checked.
        loss_bad = self._loss_nonfinite
        self._loss_nonfinite = None
        if loss_bad is None:  # no training_step since the last check
            return
        flags = [loss_bad.reshape(1)]
        in_backward = optimizer.take_nonfinite() if isinstance(optimizer, AdamWInBackward) else None
        if in_backward is not None:  # updated inside backward: a non-finite gradient was skipped there
            flags.append(in_backward.reshape(1).to(loss_bad.device))
        grads = [p.grad.detach() for p in self.parameters() if p.grad is not None]
        if grads and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: a few fused kernels
                total = torch.nn.utils.get_total_norm(grads)
            else:
                total = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]).sum()
            flags.append(~torch.isfinite(total).reshape(1).to(loss_bad.device))
        bad = self._any_rank(torch.cat(flags))
        if bad[0]:
            last = float(self._last_loss)  # set by the same training_step as loss_bad
            if not bool(loss_bad):
                value = "non-finite on another rank"
            else:  # the last micro-batch's value, or one before it (gradient accumulation)
                value = f"{last}" if not math.isfinite(last) else "non-finite in an accumulated batch"
            if self.global_step == 0:  # no update yet: the input or the network is broken, not the step size
                advice = (
                    "The weights have not been updated yet, so the cause is the input or the network, not "
                    "the learning rate (optim.lr): check the images and data.mean/data.std, and the "
                    "checkpoint (model.name_or_path); trainer.precision=32-true rules out a half-precision "
                    "overflow."
                )
            else:
                advice = (
                    "Lower optim.lr, train in trainer.precision=32-true, set trainer.gradient_clip_val, or "
                    "sample less (a higher crs.ratio or crs.min_k)."
                )
            raise FloatingPointError(
                f"training loss became {value} at epoch {self.current_epoch}, step {self.global_step} "
                f"(lr {self._lr():.3g}): stopping before this step, so the weights and checkpoints keep the "
                f"last good state. {advice}"
            )
        if any(bad[1:]):
            stop = (
                "the parameters with non-finite gradients were not updated (optim.in_backward: the others "
                "were) and training stops here, so no checkpoint holds this step"
                if in_backward is not None
                else "stopping before the optimizer step, so the weights and checkpoints keep the last good "
                "state"
            )
            raise FloatingPointError(
                f"gradients became non-finite (inf/nan) at epoch {self.current_epoch}, step "
                f"{self.global_step} (lr {self._lr():.3g}) with a finite loss: {stop}. Sample less (a higher "
                "crs.ratio or crs.min_k, crs.prob=norm), lower optim.lr, or train in "
                "trainer.precision=32-true."
            )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Finite loss and gradients can still give non-finite weights (an overflowing update): checked right
        # after the step, before any callback (a step checkpoint) sees them; one all-reduce, all ranks agree.
        weights = [p.detach() for p in self.parameters()]
        if not weights:
            return
        if hasattr(torch.nn.utils, "get_total_norm"):
            total = torch.nn.utils.get_total_norm(weights)
        else:
            total = torch.stack([torch.linalg.vector_norm(w, dtype=torch.float32) for w in weights]).sum()
        if self._any_rank(~torch.isfinite(total).reshape(1))[0]:
            raise FloatingPointError(
                f"weights became non-finite (inf/nan) in the optimizer step at epoch {self.current_epoch}, "
                f"step {self.global_step} (lr {self._lr():.3g}) from a finite loss and finite gradients: "
                "stopping before any checkpoint is written from them, so the checkpoints keep the last good "
                "state. Lower optim.lr, or train in trainer.precision=32-true."
            )

    def _crs_state(self) -> dict[str, Any]:
        """This rank's sampling state: the gradient-norm estimates by op, the sampling stream, torch's RNG
        (dropout) and, with crs.cache_in_checkpoint, the sample-cache entries by op."""
        torch_rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            torch_rng["cuda"] = torch.cuda.get_rng_state(self.device)
        budget = self.crs.budget
        state = {
            "grad_norm": {name: s.estimate.cpu() for name, s in grad_norm_sources(self.net).items()},
            "budget": None if budget is None else budget.estimate.cpu(),
            "generator": self.crs.generator.get_state(),
            "torch_rng": torch_rng,
        }
        if self.crs_config.cache_in_checkpoint:
            entries = {name: c.entries_state() for name, c in sample_caches(self.net).items()}
            state["sample_cache"] = {name: e for name, e in entries.items() if e is not None}
        return state

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning builds the checkpoint on every rank (rank 0 writes it): one entry per rank, in rank order.
        checkpoint["crs"] = gather_objects(self._crs_state())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ranks = _crs_ranks(checkpoint.get("crs"))
        if not ranks:
            return
        trainer = self._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        if len(ranks) != world and fitting:
            log.warning(
                "resuming a %d-process run with %d processes: ranks without a saved CRS stream start a fresh "
                "one (seed + rank)",
                len(ranks),
                world,
            )
        mine = ranks[rank] if rank < len(ranks) else {"grad_norm": ranks[0]["grad_norm"], "generator": None}
        sources = grad_norm_sources(self.net)
        for name, estimate in mine["grad_norm"].items():
            if name in sources:
                sources[name].estimate = estimate.to(sources[name].estimate.device)
        budget, saved = self.crs.budget, mine.get("budget")
        if budget is not None and saved is not None and saved.shape == budget.estimate.shape:
            budget.estimate = saved.to(budget.estimate.device)
        if mine["generator"] is not None:
            self.crs.generator.set_state(mine["generator"])
        elif self.hparams.get("seed") is not None:
            self.crs.generator.manual_seed(int(self.hparams.seed) + rank)
        self._pending_cache = mine.get("sample_cache") if fitting else None
        # torch's global RNG (dropout) only when training goes on, and only when the next training batch
        # starts: whatever Lightning draws before that (sanity check, loaders) must not shift it. Loading
        # weights elsewhere must not reseed the caller.
        self._pending_torch_rng = mine.get("torch_rng") if fitting else None

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        state, self._pending_torch_rng = self._pending_torch_rng, None
        if state:
            torch.set_rng_state(state["cpu"])
            if "cuda" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda"], self.device)

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        set_training_batch(self.net, None)  # the batch's backward is done: nothing else reads or writes

    def on_train_start(self) -> None:
        if self.crs_config.prob == "sample_cache":
            self._start_sample_cache()

    def _start_sample_cache(self) -> None:
        """Size the cache to the training set, restore checkpointed entries, log its host-memory cost."""
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        attach_sample_cache(self.net, len(dataset) if dataset is not None else 0)
        entries, self._pending_cache = self._pending_cache, None
        for name, cache in sample_caches(self.net).items():
            cache.load_entries_state((entries or {}).get(name))
        summary = self.sample_cache_summary()
        assert summary is not None
        total = summary["bytes_per_image"] * summary["images"]
        log.info(
            "crs.prob=sample_cache: %s bytes per image (%s) x %d training images = %.3f GiB of host memory "
            "per process%s",
            f"{summary['bytes_per_image']:,}",
            summary["format"],
            summary["images"],
            total / GIB,
            " (entries restored from the checkpoint)" if entries else "",
        )
