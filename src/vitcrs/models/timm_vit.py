"""The timm family (`model.family=timm`): `timm.create_model` Vision Transformers (`VisionTransformer` and
its subclasses, e.g. the distilled DeiT), random init, or weights from the Hub or a local file.

timm is an optional extra (`pip install "vitcrs[timm]"`); without it every entry point raises ConfigError
saying so. The model node: model.name (a timm model name, with or without its pretrained tag),
model.pretrained (load weights), model.weights (a local weights file instead of the Hub), model.config
(`create_model` keyword arguments: the architecture, drop path, layer scale, ...), model.attn_implementation
(eager: timm's explicit attention, whose matmuls can be sampled; sdpa: its fused attention).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from vitcrs.data.inputs import ModelInputs
from vitcrs.errors import ConfigError

from .family import ModelFamily, square_side

log = logging.getLogger(__name__)

TIMM_ATTN = ("eager", "sdpa")  # eager: attn.fused_attn = False (samplable matmuls); sdpa: fused attention
INSTALL = 'pip install "vitcrs[timm]"'
# create_model arguments vitcrs sets itself: the head's size (the dataset's classes) and, for another image
# size than the model's own, dynamic_img_size
SET_BY_VITCRS = ("num_classes", "dynamic_img_size", "pretrained", "pretrained_cfg_overlay")


def import_timm() -> ModuleType:
    """The timm package; ConfigError saying how to install it when it is missing."""
    try:
        import timm
    except ImportError as err:
        raise ConfigError(
            f"model.family=timm needs the timm package, which is not installed here: {INSTALL} (or "
            "pip install timm), or choose a Hugging Face model (e.g. model=vit_micro)."
        ) from err
    return timm


class TimmFamily(ModelFamily):
    """timm Vision Transformers (see the module docstring)."""

    name = "timm"
    title = "timm ViT"
    keys = ("family", "name", "pretrained", "weights", "attn_implementation", "config")

    def check(self, model: Mapping[str, Any]) -> None:
        super().check(model)
        timm = import_timm()
        name = model.get("name")
        example = "e.g. model.name=vit_base_patch16_224.augreg_in21k (timm.list_models('vit_*') lists them)"
        if not isinstance(name, str) or not timm.is_model(name):
            raise ConfigError(f"model.name={name!r} is not a timm model name: {example}.")
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError as err:  # an unknown pretrained tag
            raise ConfigError(f"model.name={name!r}: {err} Give a tag timm knows, {example}.") from err
        pretrained, weights = model.get("pretrained", False), model.get("weights")
        if not isinstance(pretrained, bool):
            raise ConfigError(f"model.pretrained={pretrained!r} is invalid: true (load weights) or false.")
        if weights is not None:
            if not pretrained:
                raise ConfigError(
                    f"model.weights={weights!r} is set, but model.pretrained=false (random init): set "
                    "model.pretrained=true to load the file, or model.weights=null."
                )
            if not isinstance(weights, str) or not Path(weights).expanduser().is_file():
                raise ConfigError(
                    f"model.weights={weights!r}: no such file. Give the weights of model.name={name} as "
                    "a local .safetensors (or .pth / .bin) file, or model.weights=null to fetch them from "
                    "the Hub."
                )
        attn = model.get("attn_implementation", "eager")
        if attn not in TIMM_ATTN:
            raise ConfigError(
                f"model.attn_implementation={attn!r} is not available for timm models: choose eager (needed "
                "to sample the attention matmuls) or sdpa (timm's fused attention)."
            )
        config = model.get("config")
        if config is not None and not isinstance(config, Mapping):
            raise ConfigError(
                f"model.config={config!r} is invalid: it must be a mapping of timm.create_model arguments "
                "(e.g. {drop_path_rate: 0.1}) or null."
            )
        refused = sorted(set(config or {}) & set(SET_BY_VITCRS))
        unknown = sorted(k for k in config or {} if k not in refused and not self.accepts_config_key(k))
        if refused or unknown:
            what = f"sets {refused} itself" if refused else f"finds no VisionTransformer argument {unknown}"
            raise ConfigError(
                f"model.config: vitcrs {what}. Give VisionTransformer arguments (img_size, patch_size, "
                "embed_dim, depth, num_heads, mlp_ratio, drop_path_rate, init_values, class_token, "
                "global_pool, reg_tokens, ...) and leave the head and image size to the dataset and data.*."
            )

    def missing_message(self, key: str) -> str:
        if key == "name":
            return (
                "model.name is missing (???): give a timm model name, e.g. model.name=vit_small_patch16_224."
            )
        return super().missing_message(key)

    def accepts_config_key(self, name: str) -> bool:
        VisionTransformer = import_timm().models.vision_transformer.VisionTransformer
        return name in inspect.signature(VisionTransformer.__init__).parameters and name not in SET_BY_VITCRS

    def weights_source(self, model: Mapping[str, Any]) -> str | None:
        if not model.get("pretrained"):
            return None
        return model.get("weights") or model.get("name")

    # -- the network ---------------------------------------------------------------------------------------
    def _create(self, model: Mapping[str, Any], num_labels: int, **kwargs: Any) -> nn.Module:
        """`timm.create_model` of the node; ConfigError for an architecture timm refuses (e.g. an embed_dim
        its heads do not divide)."""
        timm, config = import_timm(), dict(model.get("config") or {})
        try:
            net = timm.create_model(model["name"], num_classes=num_labels, **config, **kwargs)
        except (AssertionError, TypeError) as err:  # timm asserts its shapes; a bad argument type
            raise ConfigError(
                f"model.config={config}: timm.create_model({model['name']!r}) refuses it "
                f"({type(err).__name__}: {str(err).strip() or 'a shape check failed'}). Fix the "
                "architecture, e.g. an embed_dim that num_heads divides."
            ) from err
        fused = model.get("attn_implementation", "eager") == "sdpa"
        for attention in (m for m in net.modules() if hasattr(m, "fused_attn")):  # timm's Attention modules
            attention.fused_attn = fused  # eager: explicit matmuls; sdpa: F.scaled_dot_product_attention
        return net

    def meta_net(self, model: Mapping[str, Any], num_labels: int) -> nn.Module:
        with torch.device("meta"):
            return self._create(model, num_labels, pretrained=False)

    def inputs(self, model: Mapping[str, Any]) -> ModelInputs:
        """The model's own image and patch size (of the architecture model.config gives), and the mean/std of
        its pretrained config (timm's `resolve_model_data_config`)."""
        from timm.data import resolve_model_data_config

        net = self.meta_net(model, 0)
        data = resolve_model_data_config(net)
        image_size, patch_size, _ = self.grid(net)
        mean, std = tuple(float(m) for m in data["mean"]), tuple(float(s) for s in data["std"])
        return ModelInputs(image_size, mean, std, patch_size)

    def build(self, model: Mapping[str, Any], num_labels: int, class_names: list[str] | None = None,
              image_size: int | None = None) -> nn.Module:  # fmt: skip
        """`timm.create_model` with a fresh `num_labels`-way head: the encoder's weights from the Hub
        (model.pretrained) or model.weights (`pretrained_cfg_overlay=dict(file=...)`), the head re-created by
        `reset_classifier`. Another `image_size` than the model's own: `dynamic_img_size=True` (position
        embeddings interpolated in each forward). Raises ConfigError when the weights cannot be had."""
        kwargs: dict[str, Any] = {}
        if image_size is not None and int(image_size) != self.inputs(model).image_size:
            kwargs["dynamic_img_size"] = True
        pretrained, weights = bool(model.get("pretrained")), model.get("weights")
        if not pretrained:
            net = self._create(model, num_labels, pretrained=False, **kwargs)
        else:
            if weights is not None:  # custom_load: timm's own .npz loader, not a state dict file
                file = str(Path(weights).expanduser())
                kwargs["pretrained_cfg_overlay"] = {"file": file, "custom_load": False}
            try:
                net = self._create(model, num_labels, pretrained=True, **kwargs)
            except (OSError, RuntimeError, ValueError) as err:
                raise self._load_error(model, err) from err
            net.reset_classifier(num_labels)
            log.info("Loaded %s with a fresh classifier head", weights or model["name"])
        if class_names is not None:
            net.pretrained_cfg = {**net.pretrained_cfg, "label_names": tuple(class_names)}
        return net

    def _load_error(self, model: Mapping[str, Any], err: Exception) -> ConfigError:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        name, weights = model["name"], model.get("weights")
        if weights is not None:
            return ConfigError(
                f"model.weights={weights!r} cannot be loaded into model.name={name} ({type(err).__name__}: "
                f"{first_line}). Give the weights of that architecture (e.g. saved from timm.create_model"
                f"({name!r}) with safetensors), or the model.name they belong to."
            )
        return ConfigError(
            f"model.name={name!r} with model.pretrained=true: its weights were fetched from the Hugging Face "
            f"Hub, which failed ({type(err).__name__}: {first_line}). Connect to the internet once (files "
            "are cached), or download them elsewhere and set model.weights=/path/to/model.safetensors."
        )

    def logits(self, net: nn.Module, pixel_values: Tensor) -> Tensor:
        return net(pixel_values)

    def head_prefixes(self, net: nn.Module) -> tuple[str, ...]:
        """The classifier(s) of timm's pretrained config: "head." (distilled models: also "head_dist.")."""
        classifier = net.pretrained_cfg.get("classifier") or "head"
        names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        return tuple(f"{n}." for n in names)

    def owns(self, net: nn.Module) -> bool:
        return type(net).__module__.startswith("timm.")

    def grid(self, net: nn.Module) -> tuple[int, int, int]:
        embed = net.patch_embed
        return square_side(embed.img_size), square_side(embed.patch_size), int(net.num_prefix_tokens)
