"""The model-family interface: what the app needs of a family of networks (Hugging Face ViT, DeiT, DINOv2;
timm ViT), so that nothing outside `vitcrs.models` knows which one it runs.

A family reads the `model` config node as a plain dict (`model.family` selects it: `vitcrs.models.registry`):

- `check(model)`: ConfigError naming a bad `model.*` key (unknown keys, bad values, a missing package);
- `inputs(model)`: the input contract (`ModelInputs`), read without loading weights;
- `meta_net(model, num_labels)`: the network on the meta device: its architecture, no weights, no download;
- `build(model, num_labels, class_names, image_size)`: the network with a fresh `num_labels`-way head;
- `logits(net, pixel_values)`: logits [B, num_labels] of normalised images [B, 3, S, S];
- `head_prefixes(net)`: the parameter-name prefixes of its classifier head (fresh per task);
- `architecture(net)`: widths, depth and tokens per image (`Architecture`), of a meta or a real network.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from vitcrs.crs import CRSBlock, find_blocks
from vitcrs.data.inputs import ModelInputs
from vitcrs.errors import ConfigError

MISSING = "???"  # an OmegaConf value that must be given on the command line


@dataclass(frozen=True)
class Architecture:
    """What pre-flight checks and memory figures need of a network, whatever its family.

    hidden_size, num_attention_heads, num_hidden_layers: the encoder's width, heads per block and blocks;
    intermediate_size: the MLP's hidden width (fc2's input); patch_size, image_size: the model's own;
    prefix_tokens: tokens before the patches (class, distillation, register tokens; 0 for a timm model
    without class token); parameter_shapes: name -> shape of every `state_dict` entry (the resume check).
    """

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int
    patch_size: int
    image_size: int
    prefix_tokens: int
    parameter_shapes: dict[str, tuple[int, ...]] = field(repr=False, compare=False)

    def tokens(self, image_size: int | None = None) -> int:
        """Tokens per image of side `image_size` (None: the model's own): patches + prefix tokens."""
        side = self.image_size if image_size is None else int(image_size)
        return (side // self.patch_size) ** 2 + self.prefix_tokens


def square_side(size: Any) -> int:
    """An image or patch size (an int, or [height, width] / (height, width)) as one side; ConfigError for a
    size that is not square (vitcrs feeds square images)."""
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConfigError(f"model image size {list(size)} is not square: vitcrs feeds square images.")
        size = size[0]
    return int(size)


def check_architecture(arch: Architecture, image_size: int) -> None:
    """ConfigError for a network (its `Architecture`) fed images of side `image_size` that its library would
    build or run otherwise than configured, silently: a hidden size its heads do not divide (narrower
    attention), or a side its patches do not tile (the border dropped)."""
    hidden, heads = int(arch.hidden_size), int(arch.num_attention_heads)
    if heads < 1 or hidden % heads:
        width = heads * (hidden // heads) if heads >= 1 else 0
        divisors = [h for h in range(1, hidden + 1) if hidden % h == 0] or [1]
        divisor = min(divisors, key=lambda h: (abs(h - heads), h))  # the nearest head count that fits
        raise ConfigError(
            f"model.config.hidden_size={hidden} is not a multiple of model.config.num_attention_heads="
            f"{heads}: each head would get hidden_size // num_attention_heads features, so attention would "
            f"be {width} wide, not {hidden}. Fix: model.config.num_attention_heads={divisor} (or another "
            "divisor of hidden_size), or a hidden_size that the heads divide."
        )
    patch = int(arch.patch_size)
    if image_size % patch:
        raise ConfigError(
            f"image side {image_size} (data.image_size, else model.config.image_size) is not a multiple of "
            f"model.config.patch_size={patch}: the patch grid would drop the last {image_size % patch} "
            f"pixels of every row and column. Fix: data.image_size={max(patch, image_size // patch * patch)} "
            "(or another multiple of the patch size), or a patch size that divides the image side."
        )


def parameter_shapes(net: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of each `state_dict` entry of `net` (an injected network has the plain one's keys)."""
    return {name: tuple(t.shape) for name, t in net.state_dict().items()}


def dropout_rate(net: nn.Module) -> float:
    """The largest dropout or drop-path probability of any module of `net` (0.0: none)."""
    rates = [getattr(m, "p", None) if isinstance(m, nn.Dropout) else getattr(m, "drop_prob", None) for m in
             net.modules()]  # fmt: skip
    return max((float(r) for r in rates if isinstance(r, (int, float))), default=0.0)


class ModelFamily(ABC):
    """One family of networks (see the module docstring); subclasses implement the abstract methods.

    name: the `model.family` value; title: how messages call it; keys: the `model.*` keys it reads.
    """

    name = "?"
    title = "?"
    keys: tuple[str, ...] = ("family",)

    # -- the config node ------------------------------------------------------------------------------------
    def check(self, model: Mapping[str, Any]) -> None:
        """ConfigError for a `model.*` key the family does not read, or one still missing (???)."""
        unknown = sorted(set(model) - set(self.keys))
        if unknown:
            raise ConfigError(
                f"model has keys {unknown} that model.family={self.name} ({self.title}) does not read: its "
                f"keys are {', '.join(self.keys)}. Drop them, or choose the family they belong to."
            )
        for key in self.keys:
            if model.get(key) == MISSING:
                raise ConfigError(self.missing_message(key))

    def __repr__(self) -> str:
        return f"<model family {self.name}: {self.title}>"

    def missing_message(self, key: str) -> str:
        """The ConfigError message for `model.<key>` left missing (???)."""
        return f"model.{key} is missing (???): this model needs it; give it, e.g. model.{key}=..."

    @abstractmethod
    def accepts_config_key(self, name: str) -> bool:
        """Whether `model.config.<name>` is an architecture setting of this family (`+model.config.x=...`)."""

    @abstractmethod
    def weights_source(self, model: Mapping[str, Any]) -> str | None:
        """Where the weights come from (a Hub id, a local path), None for random init."""

    # -- the network ---------------------------------------------------------------------------------------
    @abstractmethod
    def inputs(self, model: Mapping[str, Any]) -> ModelInputs:
        """The input contract of the node's network (`ModelInputs`), read without loading weights."""

    @abstractmethod
    def meta_net(self, model: Mapping[str, Any], num_labels: int) -> nn.Module:
        """The network `build` would give, on the meta device: its architecture, no weights, no download."""

    @abstractmethod
    def build(self, model: Mapping[str, Any], num_labels: int, class_names: list[str] | None = None,
              image_size: int | None = None) -> nn.Module:  # fmt: skip
        """The network with a fresh `num_labels`-way head (label names `class_names`, default LABEL_i), fed
        images of side `image_size` (None: its own). Raises ConfigError when the weights cannot be had."""

    @abstractmethod
    def logits(self, net: nn.Module, pixel_values: Tensor) -> Tensor:
        """Logits [B, num_labels] of `net` for normalised images [B, 3, S, S]."""

    @abstractmethod
    def head_prefixes(self, net: nn.Module) -> tuple[str, ...]:
        """Parameter-name prefixes of `net`'s classifier head(s), e.g. ("classifier.",)."""

    @abstractmethod
    def owns(self, net: nn.Module) -> bool:
        """Whether `net` is a network of this family."""

    @abstractmethod
    def grid(self, net: nn.Module) -> tuple[int, int, int]:
        """(image size, patch size, prefix tokens) of `net`, as it is configured."""

    def architecture(self, net: nn.Module) -> Architecture:
        """The `Architecture` of `net` (plain, injected, or on the meta device); ConfigError when vitcrs.crs
        knows none of its blocks."""
        parts = [m.parts for m in net.modules() if isinstance(m, CRSBlock)]
        if not parts:
            try:
                parts = [adapter.parts(block) for _, block, adapter in find_blocks(net)]
            except ValueError as err:
                raise ConfigError(f"{type(net).__name__} ({self.title}) cannot be sampled: {err}") from err
        first = parts[0]
        image_size, patch_size, prefix = self.grid(net)
        return Architecture(
            hidden_size=int(first.qkv[0].in_features),
            num_attention_heads=int(first.heads),
            num_hidden_layers=len(parts),
            intermediate_size=int(first.fc2.in_features),
            patch_size=int(patch_size),
            image_size=int(image_size),
            prefix_tokens=int(prefix),
            parameter_shapes=parameter_shapes(net),
        )

    def meta_architecture(self, model: Mapping[str, Any], num_labels: int) -> Architecture:
        """The `Architecture` `build` would give, read without loading weights (`meta_net`)."""
        return self.architecture(self.meta_net(model, num_labels))
