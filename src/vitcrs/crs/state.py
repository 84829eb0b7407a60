"""`CRSState`: every piece of CRS state of one injected model, in one module the model owns.

`inject` adds it to the model (as the submodule `crs_state`); everything else reaches it through
`crs_state(model)`, which finds it by type (so a model wrapped in another module still finds it):

- `config`: the `CRSConfig` in effect (its `targets` are the ones injected);
- `generator`: the `SamplingGenerator` all sampled ops of the model draw from;
- `sources`: the gradient-norm sources of the sampled ops (`prob="norm_grad"` / `"sample_cache"`), one
  `ModuleDict` per block (op name -> source), their estimates non-persistent buffers (they move with `.to()`,
  stay out of `state_dict`: the model's checkpoint keys are the plain model's);
- `batch`: the training batch the sample caches read and write (`prob="sample_cache"`), else None;
- `budget`: the `SamplingBudget` the lean ops split their rows by (`budget="split"`), else None;
- `enabled`: False inside `disabled()` (`vitcrs.crs.uninjected`): every block then runs its plain forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .budget import SamplingBudget
from .config import CRSConfig
from .generator import SamplingGenerator
from .grad_norm import GradNormEMA
from .sample_cache import GradNormSource, SampleGradCache, TrainingBatch


class CRSState(nn.Module):
    """The CRS state of one injected model (see the module docstring). No parameters, no persistent state."""

    def __init__(self, config: CRSConfig, generator: SamplingGenerator | None = None) -> None:
        super().__init__()
        self.config = config
        self.generator = generator if generator is not None else SamplingGenerator()
        self.batch = TrainingBatch() if config.prob == "sample_cache" else None
        self.sources = nn.ModuleList()
        self.block_names: list[str] = []  # module path of each block, in `sources` order
        lean = bool(set(config.targets) & {"lean_block", "mlp"})
        self.budget = SamplingBudget(config) if config.budget == "split" and lean else None
        self.enabled = True

    @property
    def targets(self) -> tuple[str, ...]:
        return self.config.targets

    def add_block(self, name: str, ops: Iterable[str]) -> nn.ModuleDict:
        """New gradient-norm sources for the sampled `ops` of the block at module path `name`."""
        cfg = self.config

        def source() -> GradNormSource:
            if self.batch is not None:
                return SampleGradCache(self.batch, cfg.cache_format, cfg.grad_ema)
            return GradNormEMA(cfg.grad_ema)

        sources = nn.ModuleDict({op: source() for op in ops})
        self.sources.append(sources)
        self.block_names.append(name)
        return sources

    def named_sources(self) -> dict[str, GradNormSource]:
        """The gradient-norm sources by "<block path>.<op>" (e.g. "vit.layers.0.qkv")."""
        return {
            f"{block}.{op}": source
            for block, sources in zip(self.block_names, self.sources, strict=True)
            for op, source in sources.items()
        }

    @contextmanager
    def disabled(self) -> Iterator[CRSState]:
        """Inside: every block runs its plain, exact forward (e.g. to measure the exact baseline)."""
        before, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = before

    def extra_repr(self) -> str:
        cfg = self.config
        targets = list(cfg.targets)
        return f"ratio={cfg.ratio}, method={cfg.method}, targets={targets}, blocks={len(self.sources)}"


def crs_state(model: nn.Module) -> CRSState | None:
    """The `CRSState` of an injected model (or of a module holding one), None if nothing is injected."""
    return next((m for m in model.modules() if isinstance(m, CRSState)), None)


def grad_norm_sources(model: nn.Module) -> dict[str, GradNormSource]:
    """The gradient-norm sources of an injected model's sampled ops by "<block path>.<op>"; {} if none."""
    state = crs_state(model)
    return {} if state is None else state.named_sources()


def sample_caches(model: nn.Module) -> dict[str, SampleGradCache]:
    """The caches of an injected model by name, empty unless prob="sample_cache"."""
    return {k: s for k, s in grad_norm_sources(model).items() if isinstance(s, SampleGradCache)}


def set_training_batch(model: nn.Module, indices: Tensor | None, exact: bool = False) -> None:
    """Tell an injected model (prob="sample_cache") which training images it runs next: their dataset
    indices (int64 [B]; moved to the CPU, one host sync on a GPU), or None (no cache reads or writes). The ops
    read the cache in forward and write it in backward (also when backward runs later); `exact`: keep all
    rows (the exact warm-up). A no-op for other models."""
    state = crs_state(model)
    if state is None or state.batch is None:
        return
    state.batch.indices = None if indices is None else indices.detach().to("cpu", torch.int64)
    state.batch.exact = bool(exact) and indices is not None


@contextmanager
def training_batch(model: nn.Module, indices: Tensor | None, exact: bool = False) -> Iterator[nn.Module]:
    """`set_training_batch` for the block (run the forward and the backward inside it), None after it."""
    set_training_batch(model, indices, exact)
    try:
        yield model
    finally:
        set_training_batch(model, None)


def attach_sample_cache(model: nn.Module, dataset_size: int) -> None:
    """Keep entries for `dataset_size` training images (indices 0..dataset_size-1); drops existing entries
    of another size. A no-op unless prob="sample_cache"."""
    state = crs_state(model)
    if state is None or state.batch is None:
        return
    if state.batch.dataset_size != dataset_size:
        for cache in sample_caches(model).values():
            cache.clear()
    state.batch.dataset_size = int(dataset_size)


def sample_cache_nbytes(model: nn.Module) -> int:
    """Host bytes the model's cache entries take now (this process)."""
    return sum(c.nbytes for c in sample_caches(model).values())
