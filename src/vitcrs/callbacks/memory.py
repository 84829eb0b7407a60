"""`PeakMemoryMonitor`: training memory and speed, measured the same way for every run."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from vitcrs.crs import SavedTensorsMeter, crs_state, uninjected
from vitcrs.distributed import gather_objects, sync_logged_metrics
from vitcrs.errors import check_int
from vitcrs.record import KEY, RunRecord
from vitcrs.units import GIB, MIB


class PeakMemoryMonitor(Callback):
    """Peak GPU memory, bytes saved for backward, and training throughput.

    - CUDA: peak stats are reset at fit start and at every epoch start; per epoch (training plus the
      validation that follows it) it logs `mem/peak_allocated_gib` and `mem/peak_reserved_gib`
      (`torch.cuda.max_memory_allocated/reserved`, GiB = 2^30 bytes); the run peaks are their maxima.
    - Every device: on the first training batch the forward pass runs inside a `SavedTensorsMeter`, giving
      `saved_bytes_per_step`: bytes of non-parameter tensors autograd keeps for backward (the activation
      memory CRS reduces). Logged as `mem/saved_mib_per_step`. On CPU this is the only memory figure.
      Side by side, on the same batch and precision, one extra forward of the same network run exact
      (`vitcrs.crs.uninjected`; RNG state untouched, graph dropped) gives `saved_bytes_per_step_exact`, so
      every run reports its own reduction factor. Skipped when nothing is injected (then they are equal).
    - Throughput `perf/images_per_s`: images over the wall time of training batches only (forward, backward,
      optimizer step; data loading and validation excluded), leaving out the first `warmup_batches` of
      the run. CUDA is synchronised around each timed batch.

    - Data parallel (several ranks): every rank measures itself; at each epoch end the ranks' run figures are
      gathered, so the summary has the largest peak, the per-rank peaks (`*_per_rank`, in rank order) and the
      throughput of all ranks together (their images over the slowest rank's time).

    `fill(record)` sets the run figures of a metrics.json `RunRecord` (None where not measured).
    """

    def __init__(self, warmup_batches: int = 2) -> None:
        self.warmup_batches = check_int("callbacks.memory.warmup_batches", warmup_batches, 0, example=2)
        self.peak_allocated_gib: float | None = None
        self.peak_reserved_gib: float | None = None
        self.saved_bytes_per_step: int | None = None
        self.saved_bytes_per_step_exact: int | None = None
        self._images = 0
        self._seconds = 0.0
        self._batches = 0
        self._epoch_images = 0
        self._epoch_seconds = 0.0
        self._t0: float | None = None
        self._meter: SavedTensorsMeter | None = None
        self._restored: dict[str, Any] | None = None
        # per rank, in rank order: [peak allocated GiB, peak reserved GiB, images, seconds]
        self._per_rank: list[list[float]] | None = None

    @staticmethod
    def _cuda(pl_module: LightningModule) -> torch.device | None:
        return pl_module.device if pl_module.device.type == "cuda" else None

    def _mine(self) -> list[float]:
        """This process's run figures: [peak allocated GiB, peak reserved GiB, images, seconds]."""
        peaks = [math.nan if v is None else v for v in (self.peak_allocated_gib, self.peak_reserved_gib)]
        return [*peaks, float(self._images), self._seconds]

    def _rows(self) -> list[list[float]]:
        """The per-rank figures: gathered ones when there are several ranks, else this process's."""
        return self._per_rank if self._per_rank is not None else [self._mine()]

    def fill(self, record: RunRecord) -> None:
        """Set the run figures of `record` (None where not measured)."""
        rows = self._rows()

        def peaks(i: int) -> list[float | None] | None:
            values = [None if math.isnan(r[i]) else r[i] for r in rows]
            return None if all(v is None for v in values) else values

        alloc, reserved = peaks(0), peaks(1)
        images, seconds = sum(r[2] for r in rows), max(r[3] for r in rows)
        record.peak_mem_allocated_gib = max(v for v in alloc if v is not None) if alloc else None
        record.peak_mem_reserved_gib = max(v for v in reserved if v is not None) if reserved else None
        record.peak_mem_allocated_gib_per_rank = alloc
        record.peak_mem_reserved_gib_per_rank = reserved
        record.saved_bytes_per_step = self.saved_bytes_per_step
        record.saved_bytes_per_step_exact = self.saved_bytes_per_step_exact
        record.images_per_s = images / seconds if seconds > 0 else None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._restored is not None:  # resuming: carry the earlier segments' figures on
            state, self._restored = self._restored, None
            self.peak_allocated_gib = state["peak_allocated_gib"]
            self.peak_reserved_gib = state["peak_reserved_gib"]
            self._images, self._seconds = state["images"], state["seconds"]
            # measured on the run's first batch: a resumed segment with no training batch left keeps them
            self.saved_bytes_per_step = state.get(KEY.saved_bytes_per_step)
            self.saved_bytes_per_step_exact = state.get(KEY.saved_bytes_per_step_exact)
            rows, rank = state.get("per_rank"), trainer.global_rank
            if rows is not None and len(rows) == trainer.world_size:  # this rank's own figures
                self._per_rank = rows
                a, r, self._images, self._seconds = rows[rank]
                self.peak_allocated_gib = None if math.isnan(a) else a
                self.peak_reserved_gib = None if math.isnan(r) else r
                self._images = int(self._images)
        if (dev := self._cuda(pl_module)) is not None:
            torch.cuda.reset_peak_memory_stats(dev)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (dev := self._cuda(pl_module)) is not None:
            torch.cuda.reset_peak_memory_stats(dev)
        self._epoch_images, self._epoch_seconds = 0, 0.0

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.saved_bytes_per_step is None:
            self._measure_exact(trainer, pl_module, batch)
            self._meter = SavedTensorsMeter(exclude=pl_module.parameters()).__enter__()
        if (dev := self._cuda(pl_module)) is not None:
            torch.cuda.synchronize(dev)
        self._t0 = time.perf_counter()

    def _measure_exact(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """Saved-for-backward bytes of this batch's forward with the network run exact (no CRS)."""
        net = getattr(pl_module, "net", None)
        state = crs_state(net) if net is not None else None
        if state is None or not state.targets:
            return
        dev = self._cuda(pl_module)
        with (
            torch.random.fork_rng(devices=[dev] if dev is not None else []),
            uninjected(net),
            trainer.precision_plugin.forward_context(),
            SavedTensorsMeter(exclude=pl_module.parameters()) as meter,
        ):
            loss = pl_module.loss(batch)[0]
        del loss
        self.saved_bytes_per_step_exact = meter.bytes
        if dev is not None:  # the extra forward must not count in this epoch's peak
            torch.cuda.reset_peak_memory_stats(dev)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        self._close_meter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._close_meter()
        if (dev := self._cuda(pl_module)) is not None:
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - (self._t0 or time.perf_counter())
        self._batches += 1
        if self._batches > self.warmup_batches:
            images = len(batch[0])
            self._images += images
            self._seconds += seconds
            self._epoch_images += images
            self._epoch_seconds += seconds

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (dev := self._cuda(pl_module)) is not None:
            allocated = torch.cuda.max_memory_allocated(dev) / GIB
            reserved = torch.cuda.max_memory_reserved(dev) / GIB
            self.peak_allocated_gib = max(self.peak_allocated_gib or 0.0, allocated)
            self.peak_reserved_gib = max(self.peak_reserved_gib or 0.0, reserved)
            pl_module.log("mem/peak_allocated_gib", allocated, sync_dist=True, reduce_fx="max")
            pl_module.log("mem/peak_reserved_gib", reserved, sync_dist=True, reduce_fx="max")
        if self.saved_bytes_per_step is not None:
            pl_module.log("mem/saved_mib_per_step", self.saved_bytes_per_step / MIB, sync_dist=True)
        if self.saved_bytes_per_step_exact is not None:
            exact_mib = self.saved_bytes_per_step_exact / MIB
            pl_module.log("mem/saved_mib_per_step_exact", exact_mib, sync_dist=True)
        if self._epoch_seconds > 0:
            # all ranks together (each rank's images per second, summed)
            rate = self._epoch_images / self._epoch_seconds
            pl_module.log("perf/images_per_s", rate, sync_dist=True, reduce_fx="sum")
        if trainer is not None and trainer.world_size > 1:  # a collective: all ranks come here each epoch
            sync_logged_metrics(trainer)  # first, as rank 0's progress bar may have done already
            self._per_rank = gather_objects(self._mine())

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close_meter()

    def _close_meter(self) -> None:
        """Leave the saved-tensors hooks (once the forward is done) and keep the measured bytes."""
        if self._meter is not None:
            self._meter.__exit__(None, None, None)
            self.saved_bytes_per_step = self._meter.bytes
            self._meter = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "peak_allocated_gib": self.peak_allocated_gib,
            "peak_reserved_gib": self.peak_reserved_gib,
            "images": self._images,
            "seconds": self._seconds,
            "per_rank": self._per_rank,
            KEY.saved_bytes_per_step: self.saved_bytes_per_step,
            KEY.saved_bytes_per_step_exact: self.saved_bytes_per_step_exact,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied at fit start only: `trainer.test(ckpt_path=...)` also loads callback states, and must not
        # replace this run's figures with those saved in the checkpoint.
        self._restored = dict(state_dict)
