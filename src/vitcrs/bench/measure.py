"""Building the benchmarked model, and measuring it: saved-for-backward bytes, step time, peak memory."""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import wraps
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from vitcrs.conf import CONF_DIR
from vitcrs.crs import CRSBlock, SavedTensorsMeter, adapter_for, inject
from vitcrs.errors import ConfigError
from vitcrs.models import Architecture, ModelFamily, family_of, model_family, model_logits
from vitcrs.models.timm_vit import import_timm

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
# the Hugging Face model types a --model-path checkpoint may have -> their model family
HF_MODEL_TYPES = {"vit": "hf_vit", "deit": "hf_deit", "dinov2": "hf_dinov2"}
# the shape overrides (ViTConfig names, as --layers / --image-size / --patch-size give them) in timm's names
TIMM_NAMES = {"num_hidden_layers": "depth", "image_size": "img_size", "patch_size": "patch_size"}


def model_configs() -> list[str]:
    """The model configs of conf/model (e.g. vit_micro, timm_micro), which --model also takes."""
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


@dataclass(frozen=True)
class ModelSpec:
    """Which network to build, + shape overrides (ViTConfig names: num_hidden_layers, image_size,
    patch_size; a timm model gets them as depth, img_size, patch_size).

    name: a named shape of MODELS (a Hugging Face ViT at random init), a model config of conf/model (any
        family, as `python -m vitcrs.train model=<name>` builds it), or a timm model name (random init);
    path: a local Hugging Face ViT / DeiT / DINOv2 checkpoint directory (overrides name).
    """

    name: str = "vit_b16"
    path: str | None = None
    num_labels: int = 10
    overrides: dict = field(default_factory=dict)

    def model_node(self, attn: str) -> dict:
        """The `model` config node of this network with attention `attn` (eager or sdpa); ConfigError for a
        name that is none of the above."""
        config = dict(self.overrides)
        if self.path:
            saved = json.loads((Path(self.path) / "config.json").read_text())
            family = HF_MODEL_TYPES.get(saved.get("model_type"))
            if family is None:
                raise ConfigError(
                    f"--model-path={self.path!r} is a {saved.get('model_type')!r} checkpoint: the bench "
                    f"takes Hugging Face {', '.join(HF_MODEL_TYPES)} checkpoints (or --model with a timm "
                    "name)."
                )
            node = {"family": family, "name_or_path": self.path, "config": config}
            if family == "hf_deit":
                teacher = "DeiTForImageClassificationWithTeacher"
                node["with_teacher"] = teacher in saved.get("architectures", [])
        elif self.name in MODELS:
            shape = {"image_size": 224, "patch_size": 16, **MODELS[self.name], **config}
            node = {"family": "hf_vit", "name_or_path": None, "config": shape}
        elif self.name in model_configs():
            node = OmegaConf.to_container(
                OmegaConf.load(CONF_DIR / "model" / f"{self.name}.yaml"), resolve=True
            )
            if node.get("family") == "timm":
                config = {TIMM_NAMES[k]: v for k, v in config.items()}
            node["config"] = {**(node.get("config") or {}), **config} or None
        else:
            timm = import_timm()
            if not timm.is_model(self.name):
                raise ConfigError(
                    f"--model={self.name!r} is none of: a named shape ({', '.join(MODELS)}), a model config "
                    f"({', '.join(model_configs())}), or a timm model name (e.g. vit_small_patch16_224)."
                )
            config = {TIMM_NAMES[k]: v for k, v in config.items()}
            node = {"family": "timm", "name": self.name, "pretrained": False, "config": config or None}
        return {**node, "attn_implementation": attn}

    @property
    def family(self) -> ModelFamily:
        """The model family of the network (its node checked: ConfigError)."""
        return model_family(self.model_node("eager"))

    @property
    def weights(self) -> str | None:
        """Where the network's weights come from (a checkpoint, a Hub id, a file), None for random init."""
        node = self.model_node("eager")
        return model_family(node).weights_source(node)

    def build(self, attn: str) -> nn.Module:
        """The model; its `Architecture.image_size` is the side the bench feeds it.

        A Hugging Face checkpoint given another image_size keeps its own position embeddings, interpolated to
        the new patch grid in every forward (`loss_of`), as training does (not re-initialised for the new
        size); a pretrained timm model resamples them when it loads (timm's img_size).
        """
        node = self.model_node(attn)
        family = model_family(node)
        image_size = (node.get("config") or {}).get("image_size") if node.get("name_or_path") else None
        if image_size is not None:  # a checkpoint: loaded at its own size, fed image_size (interpolated)
            node["config"] = {k: v for k, v in node["config"].items() if k != "image_size"}
        model = family.build(node, self.num_labels)
        if image_size is not None:
            model.config.image_size = image_size
        return model

    def to_dict(self) -> dict:
        return asdict(self)


def architecture(model: nn.Module) -> Architecture:
    """The `Architecture` of a built (plain or injected) model of any family."""
    return family_of(model).architecture(model)


def unmodelled_block_parts(model: nn.Module) -> list[str]:
    """What the model's encoder blocks have beyond the plain ViT block the analytic model describes (layer
    scale, a gated MLP, parameters inside the attention core such as qk-norms)."""
    block = encoder_layers(model)[0]
    parts = block.parts if isinstance(block, CRSBlock) else adapter_for(block).parts(block)
    extras = []
    if any(True for m in (*parts.post_attention, *parts.post_mlp) for _ in m.parameters()):
        extras.append("layer scale")
    if parts.gated:
        extras.append("a gated (SwiGLU) MLP")
    if parts.attn_core_params:
        extras.append("qk-norms")
    return extras


def block_shape(arch: Architecture, batch: int) -> BlockShape:
    """One encoder block's input of `batch` images at the model's own size (tokens include prefix tokens)."""
    return BlockShape(
        batch,
        arch.tokens(),
        arch.hidden_size,
        arch.num_attention_heads,
        arch.intermediate_size,
        arch.num_hidden_layers,
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


def enable_checkpointing(model: nn.Module) -> None:
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


def measured_block_saved_bytes(model: nn.Module, batch: int, precision: str, layer: int = 0) -> int:
    """Measured bytes one encoder block of `model` saves for backward, for a random input of `batch`."""
    device = next(model.parameters()).device
    shape = block_shape(architecture(model), batch)
    h = torch.randn(batch, shape.tokens, shape.hidden, device=device, requires_grad=True)
    block = encoder_layers(model)[layer]
    return measure_saved_bytes(lambda: block(h), list(model.parameters()), device, precision)


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of the model on x; position embeddings follow x's size (as in training)."""
    return F.cross_entropy(model_logits(model, x).float(), y)


def model_saved_bytes(model: nn.Module, x: Tensor, y: Tensor, precision: str) -> int:
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


def build(spec: ModelSpec, cfg: BenchConfig, device: torch.device, seed: int) -> nn.Module:
    """The model of one configuration, in train mode; every configuration gets the same initial weights."""
    torch.manual_seed(seed)
    if spec.weights is not None:  # loaded on the CPU, then moved
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
    model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, precision: str
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
