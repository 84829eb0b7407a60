"""`inject`: install CRS in every encoder block of a ViT (any supported family), keeping its state_dict keys.

Each block the adapters know (`vitcrs.crs.adapters`) is replaced by a `CRSBlock` that adopts its submodules
under their own names; the model gains one submodule, `crs_state` (a `CRSState`: settings, sampling stream,
gradient-norm sources), which holds no parameters and nothing persistent. An injected model's `state_dict`
loads into the plain model and back.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext

from torch import nn

from .adapters import ADAPTERS, BlockAdapter, adapter_for
from .block import CRSBlock, sampled_ops
from .config import CRSConfig
from .generator import SamplingGenerator
from .state import CRSState, crs_state
from .targets import validate_targets

log = logging.getLogger(__name__)
STATE_NAME = "crs_state"  # the submodule of an injected model that holds its CRSState


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return model.get_submodule(parent), name


def _uninject(model: nn.Module) -> None:
    """Put every original block back and drop the CRS state (a model injected earlier)."""
    for path, module in list(model.named_modules()):
        if isinstance(module, CRSBlock):
            parent, name = _parent(model, path)
            setattr(parent, name, module.restore())
    for path, module in list(model.named_modules()):
        if isinstance(module, CRSState):
            parent, name = _parent(model, path)
            delattr(parent, name)


def _repeated_class(model: nn.Module) -> str | None:
    """The class of the repeated blocks of a model (a ModuleList / Sequential of one class), if any."""
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1:
            classes = Counter(type(m) for m in module)
            cls, count = classes.most_common(1)[0]
            if count > 1:
                return f"{cls.__module__}.{cls.__qualname__}"
    return None


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, BlockAdapter]]:
    """(module path, block, adapter) of every encoder block of `model` an adapter knows; ValueError naming
    the block class found, and how to add an adapter, when there is none."""
    found = [(path, m, a) for path, m in model.named_modules() if (a := adapter_for(m)) is not None]
    if found:
        if found[0][0] == "":
            raise ValueError("inject needs the model that holds the encoder blocks, not a single block")
        return found
    repeated = _repeated_class(model)
    seen = f" (its repeated blocks are {repeated})" if repeated else ""
    raise ValueError(
        f"inject found no encoder blocks it knows in {type(model).__name__}{seen}: it supports "
        f"{'; '.join(a.name for a in ADAPTERS)} blocks. For another block class, write an adapter "
        "(a BlockAdapter subclass in vitcrs.crs.adapters; docs/crs.md, 'Adding a model family')."
    )


def inject(
    model: nn.Module,
    crs_config: CRSConfig,
    targets: Iterable[str] | None = None,
    generator: SamplingGenerator | None = None,
) -> nn.Module:
    """Sample the backward pass of the `targets` ops (None: `crs_config.targets`) in every encoder block of
    `model` (a transformers ViT / DeiT / DINOv2 model, a timm VisionTransformer, or any module holding one);
    returns `model`, injected in place.

    Targets (`vitcrs.crs.targets`): linear "query", "key", "value", "attn_output", "fc1", "fc2"; matmul
    "scores" (Q Kᵀ) and "context" (P V), which need eager attention; "mlp", the MLP branch keeping only its
    input; "lean_block", the whole block keeping only the residual stream (stands alone). A block that cannot
    sample a target (e.g. timm's fused qkv asked for "query" alone) is a ValueError naming it. generator: the
    sampling stream (default: the one of an earlier `inject` on this model, else a new unseeded one). Calling
    it again replaces the settings. At ratio 1 the numerics equal the plain model's.
    """
    if targets is not None:  # the targets asked for here replace the config's
        crs_config = dataclasses.replace(crs_config, targets=validate_targets(targets, None))
    targets = crs_config.targets
    earlier = crs_state(model)
    if earlier is not None:
        generator = generator or earlier.generator
        _uninject(model)
    blocks = find_blocks(model)
    for _, block, adapter in blocks:
        adapter.check_targets(block, targets)
    state = CRSState(crs_config, generator)
    ops = sampled_ops(targets)
    for path, block, adapter in blocks:
        parent, name = _parent(model, path)
        setattr(parent, name, CRSBlock(block, adapter, state, state.add_block(path, ops)))
    model.add_module(STATE_NAME, state)
    families = Counter(a.name for _, _, a in blocks)
    log.info(
        "vitcrs.crs.inject: %s blocks (%s ... %s) sample %s at ratio %g (%s)",
        " + ".join(f"{n} {name}" for name, n in families.items()),
        blocks[0][0],
        blocks[-1][0],
        ",".join(targets) or "nothing",
        float(crs_config.ratio),
        crs_config.method,
    )
    return model


@contextmanager
def uninjected(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as the plain, exact model inside the block (e.g. to measure the exact baseline)."""
    state = crs_state(model)
    with state.disabled() if state is not None else nullcontext():
        yield model
