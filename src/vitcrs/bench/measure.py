"""Building the benchmarked model, and measuring it: saved-for-backward bytes, step time, peak memory."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import wraps

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import ViTConfig, ViTForImageClassification

from vitcrs.crs import CRSBlock, SavedTensorsMeter, adapter_for, inject

from .analytic import BlockShape, largest_fitting
from .grid import BenchConfig


def _shape(hidden: int, layers: int, heads: int, mlp: int) -> dict[str, int]:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": mlp,
    }


MODELS: dict[str, dict[str, int]] = {
    "vit_b16": _shape(768, 12, 12, 3072),
    "vit_tiny": _shape(192, 12, 3, 768),
}


@dataclass(frozen=True)
class ModelSpec:
    """Which ViT to build: a named shape at random init or a local Hugging Face checkpoint, + overrides."""

    name: str = "vit_b16"
    path: str | None = None
    num_labels: int = 10
    overrides: dict = field(default_factory=dict)  # ViTConfig: num_hidden_layers, image_size, patch_size

    def build(self, attn: str) -> ViTForImageClassification:
        """The model; its `config.image_size` is the side the bench feeds it.

        A checkpoint given another image_size keeps its own position embeddings, interpolated to the new patch
        grid in every forward (`loss_of`), as training does (not re-initialised for the new size).
        """
        if self.path:
            overrides = {k: v for k, v in self.overrides.items() if k != "image_size"}
            model = ViTForImageClassification.from_pretrained(
                self.path,
                num_labels=self.num_labels,
                ignore_mismatched_sizes=True,
                attn_implementation=attn,
                **overrides,
            )
            if "image_size" in self.overrides:
                model.config.image_size = self.overrides["image_size"]
            return model
        shape = {"image_size": 224, "patch_size": 16, **MODELS[self.name], **self.overrides}
        config = ViTConfig(**shape, num_labels=self.num_labels, attn_implementation=attn)
        return ViTForImageClassification(config)

    def to_dict(self) -> dict:
        return asdict(self)


def block_shape(config: ViTConfig, batch: int) -> BlockShape:
    tokens = (config.image_size // config.patch_size) ** 2 + 1  # patches + [CLS]
    return BlockShape(
        batch,
        tokens,
        config.hidden_size,
        config.num_attention_heads,
        config.intermediate_size,
        config.num_hidden_layers,
    )


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder blocks of a model, plain or injected (`CRSBlock`)."""
    return [m for m in model.modules() if isinstance(m, CRSBlock) or adapter_for(m) is not None]


def autocast_ctx(device: torch.device, precision: str) -> AbstractContextManager:
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}")


# ---------------------------------------------------------------- saved-for-backward bytes
class _Meter(SavedTensorsMeter):
    """`SavedTensorsMeter` that can also count tensors kept alive another way (checkpointed-block inputs)."""

    def record(self, t: Tensor) -> None:
        """Count `t`'s storage as kept for backward (e.g. a checkpointed block's input)."""
        self._pack(t)


_active_meters: list[_Meter] = []


def enable_checkpointing(model: ViTForImageClassification) -> None:
    """`activation_checkpointing_enable()`, with each checkpointed block's inputs visible to the meter.

    Non-reentrant checkpointing keeps a block's inputs for the recomputation by reference, not through
    saved-tensor hooks, and hides what the block saves behind its own hooks; without this the meter would
    miss the inputs (one hidden state per block) that checkpointing does keep.
    """
    model.activation_checkpointing_enable()
    for module in model.modules():
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if fn is None or getattr(fn, "_vitcrs_bench", False):
            continue

        @wraps(fn)
        def recorded(function, *args, _fn=fn, **kwargs):
            for meter in _active_meters:
                for a in args:
                    if isinstance(a, Tensor):
                        meter.record(a)
            return _fn(function, *args, **kwargs)

        recorded._vitcrs_bench = True  # type: ignore[attr-defined]
        module._gradient_checkpointing_func = recorded


def measure_saved_bytes(
    fn: Callable[[], object], exclude: list[Tensor], device: torch.device, precision: str
) -> int:
    """Bytes of the distinct storages `fn()` saves for backward, run under `precision`'s autocast.

    `exclude` (the parameters) is not counted; the graph is dropped afterwards without a backward.
    """
    with autocast_ctx(device, precision), _Meter(exclude) as meter:
        _active_meters.append(meter)
        try:
            out = fn()
        finally:
            _active_meters.remove(meter)
        saved = meter.bytes
    del out
    return saved


def measured_block_saved_bytes(
    model: ViTForImageClassification, batch: int, precision: str, layer: int = 0
) -> int:
    """Measured bytes one encoder block of `model` saves for backward, for a random input of `batch`."""
    device = next(model.parameters()).device
    shape = block_shape(model.config, batch)
    h = torch.randn(batch, shape.tokens, shape.hidden, device=device, requires_grad=True)
    block = encoder_layers(model)[layer]
    return measure_saved_bytes(lambda: block(h), list(model.parameters()), device, precision)


def loss_of(model: ViTForImageClassification, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of the model on x; position embeddings follow x's size (as in training)."""
    return F.cross_entropy(model(x, interpolate_pos_encoding=True).logits.float(), y)


def model_saved_bytes(model: ViTForImageClassification, x: Tensor, y: Tensor, precision: str) -> int:
    """Measured bytes a whole training forward (model and loss) saves for backward."""
    return measure_saved_bytes(lambda: loss_of(model, x, y), list(model.parameters()), x.device, precision)


# ---------------------------------------------------------------- building a configuration
def synthetic_batch(
    batch: int, image_size: int, num_labels: int, device: torch.device, seed: int
) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image_size, image_size, generator=g)
    y = torch.randint(0, num_labels, (batch,), generator=g)
    return x.to(device), y.to(device)


def build(spec: ModelSpec, cfg: BenchConfig, device: torch.device, seed: int) -> ViTForImageClassification:
    """The model of one configuration, in train mode; every configuration gets the same initial weights."""
    torch.manual_seed(seed)
    if spec.path:
        model = spec.build(cfg.attn)
    else:
        with torch.device(device):  # random init directly on the device (fast on a GPU)
            model = spec.build(cfg.attn)
    if not cfg.exact:
        inject(model, cfg.crs_config, cfg.target_names)
    if cfg.checkpointing:
        enable_checkpointing(model)
    return model.to(device).train()


# ---------------------------------------------------------------- training steps
def make_step(
    model: ViTForImageClassification, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, precision: str
) -> Callable[[], None]:
    def step() -> None:
        with autocast_ctx(x.device, precision):
            loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds per timed step (CUDA events on a GPU, perf_counter elsewhere), after `warmup` steps."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return times


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    sizes = {}
    for t in tensors:
        storage = t.untyped_storage()
        sizes[storage.data_ptr()] = storage.nbytes()
    return sum(sizes.values())


def cpu_peak_bytes(step: Callable[[], None], live: Iterable[Tensor]) -> int:
    """Peak bytes of CPU tensors alive during one `step()`: the CPU counterpart of
    `torch.cuda.max_memory_allocated` (without its 512-byte rounding and the cuBLAS workspace).

    `live`: the tensors that exist before the step and through it (parameters, optimizer state, the batch),
    counted by distinct storage. On top, the highest net allocation during the step, from the allocation and
    free events the profiler records (`profile_memory=True`).
    """
    from torch.profiler import ProfilerActivity, profile

    static = storage_bytes(live)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = getattr(prof.profiler, "kineto_results", None)
    if events is None:
        raise RuntimeError("this torch's profiler gives no memory events: the CPU peak cannot be measured")
    memory = sorted((e for e in events.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    net = peak = 0
    for e in memory:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            net += e.nbytes()
            peak = max(peak, net)
    return static + peak


def images_per_s(batch: int, times: list[float]) -> float | None:
    return batch / statistics.median(times) if times else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def cuda_max_batch(
    trial: Callable[[int], None], device: torch.device, budget_bytes: int, start: int, cap: int = 8192
) -> int:
    """The largest batch whose training steps `trial(b)` run within `budget_bytes` of CUDA memory.

    The caching allocator is capped at the budget (`set_per_process_memory_fraction`), so a batch that needs
    more raises OOM; doubling from `start`, then bisection. Peak reserved memory is checked as well.
    """
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), device)

    def fits(b: int) -> bool:
        free_memory(device)
        ok = True
        try:
            trial(b)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not is_oom(exc):
                raise
            ok = False
        ok = ok and torch.cuda.max_memory_reserved(device) <= budget_bytes
        free_memory(device)
        return ok

    try:
        return largest_fitting(fits, start, cap)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
