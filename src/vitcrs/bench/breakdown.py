"""Where a CPU training step's peak memory goes: weights, optimizer state, the batch, gradients, kept
activations and transient workspace, at the moment of the peak.

The peak is the one `measure.cpu_peak_bytes` reports (the torch profiler's allocation and free events on top
of the tensors alive before the step). Beside the profile, the step is sampled at every moment the known parts
change: each tensor saved for backward (forward), each use of one in backward, each gradient accumulated (and
freed, for an update inside backward). A sample holds the bytes of the saved storages still alive and of the
gradients alive; the sample just before the peak gives those parts at the peak, and the transient workspace is
what is left: recomputations in backward, temporaries of the op running at the peak, the loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef

from .measure import storage_bytes


@dataclass(frozen=True)
class PeakBreakdown:
    """Bytes at the peak of one training step (they sum to `peak`)."""

    peak: int
    weights: int
    optimizer_state: int
    batch: int
    gradients: int
    kept_activations: int
    transient: int

    PARTS = ("weights", "optimizer_state", "batch", "gradients", "kept_activations", "transient")


class _Samples:
    """Time-stamped (kept activation bytes, gradient bytes) of one step, recorded by autograd hooks."""

    def __init__(self, params: list[nn.Parameter], batch: list[Tensor]) -> None:
        self.params = params
        self.excluded = {t.untyped_storage().data_ptr() for t in [*params, *batch]}  # counted as they are
        self.saved: dict[int, tuple[StorageWeakRef, int]] = {}
        self.times: list[int] = []
        self.values: list[tuple[int, int]] = []

    def sample(self) -> None:
        kept = sum(n for ref, n in self.saved.values() if not ref.expired())
        grads = storage_bytes(p.grad for p in self.params if p.grad is not None)
        self.times.append(time.time_ns())
        self.values.append((kept, grads))

    def pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.excluded and key not in self.saved:
            self.saved[key] = (StorageWeakRef(storage), storage.nbytes())
            self.sample()
        return t.detach()  # (the same storage; `t` itself would make saved outputs reference cycles)

    def unpack(self, t: Tensor) -> Tensor:
        self.sample()
        return t

    def at(self, when_ns: int) -> tuple[int, int]:
        """(kept, gradient) bytes of the last sample at or before `when_ns` ((0, 0) before any)."""
        last = (0, 0)
        for t, value in zip(self.times, self.values, strict=True):
            if t > when_ns:
                break
            last = value
        return last


def cpu_peak_breakdown(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: Callable[[], None],
    batch: Iterable[Tensor],
) -> PeakBreakdown:
    """Run `step()` (forward, backward and the update of `model` by `optimizer`) once under the profiler and
    the samplers, and split its CPU peak at the moment it happens."""
    from torch.profiler import ProfilerActivity, profile

    params = [p for p in model.parameters()]
    weights = storage_bytes(params)
    state = storage_bytes(
        v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor) and v.dim() > 0
    )
    batch = list(batch)
    batch_bytes = storage_bytes(batch)
    samples = _Samples(params, batch)
    trained = [p for p in params if p.requires_grad]
    hooks = [p.register_post_accumulate_grad_hook(lambda _: samples.sample()) for p in trained]
    try:
        with (
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
            torch.autograd.graph.saved_tensors_hooks(samples.pack, samples.unpack),
        ):
            step()
    finally:
        for hook in hooks:
            hook.remove()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    net = high = 0
    when = events[0].start_ns() if events else 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            net += e.nbytes()
            if net > high:
                high, when = net, e.start_ns()
    kept, grads = samples.at(when)
    peak = weights + state + batch_bytes + high
    transient = peak - weights - state - batch_bytes - kept - grads
    return PeakBreakdown(peak, weights, state, batch_bytes, grads, kept, transient)
