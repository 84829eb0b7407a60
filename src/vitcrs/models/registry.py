"""The model families by name (`model.family`), and the lookups the app makes through them.

`model_family(model)` picks and checks the family of a `model` config node (default `hf_vit`, so nodes and
checkpoints from before `model.family` existed still load); `family_of(net)` the family of a built network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from vitcrs.errors import ConfigError

from .family import ModelFamily
from .hf import HFDeiTFamily, HFDinov2Family, HFFamily
from .timm_vit import TimmFamily

FAMILIES: dict[str, ModelFamily] = {
    f.name: f for f in (HFFamily(), HFDeiTFamily(), HFDinov2Family(), TimmFamily())
}
DEFAULT_FAMILY = "hf_vit"


def named_family(model: Mapping[str, Any]) -> ModelFamily | None:
    """The family `model.family` names (default hf_vit), None for an unknown name; the node is not checked."""
    name = model.get("family", DEFAULT_FAMILY)
    return FAMILIES.get(name) if isinstance(name, str) else None


def model_family(model: Mapping[str, Any]) -> ModelFamily:
    """The family of the `model` node (a plain dict), its keys checked: ConfigError naming the bad key."""
    if not isinstance(model, Mapping):
        raise ConfigError(f"model={model!r} is invalid: it must be a mapping (a conf/model/*.yaml node).")
    family = named_family(model)
    if family is None:
        raise ConfigError(
            f"model.family={model.get('family')!r} is unknown: choose one of {', '.join(FAMILIES)} (e.g. "
            "model=timm_micro for a timm ViT, model=vit_micro for a Hugging Face one)."
        )
    family.check(model)
    return family


def family_of(net: nn.Module) -> ModelFamily:
    """The family whose networks `net` is; ValueError for a network of none."""
    family = next((f for f in FAMILIES.values() if f.owns(net)), None)
    if family is None:
        raise ValueError(
            f"{type(net).__name__} is a network of no vitcrs model family ({', '.join(FAMILIES)})"
        )
    return family


def model_logits(net: nn.Module, pixel_values: Tensor) -> Tensor:
    """Logits [B, num_labels] of any family's network for normalised images [B, 3, S, S]."""
    return family_of(net).logits(net, pixel_values)


def head_prefixes(net: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the classifier head(s) of any family's network."""
    return family_of(net).head_prefixes(net)


def model_label(model: Mapping[str, Any], choice: str | None = None) -> str:
    """How records name the model: where its weights come from, else the conf/model option chosen (`choice`,
    e.g. "timm_micro"), else "random-init"."""
    family = named_family(model)
    source = family.weights_source(model) if family is not None else None
    return source or choice or "random-init"
