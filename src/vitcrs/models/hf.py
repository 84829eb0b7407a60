"""The Hugging Face families: `hf_vit` (ViT), `hf_deit` (DeiT, one head or both with_teacher), `hf_dinov2`
(DINOv2): from a checkpoint with a fresh classifier head, or randomly initialised from `model.config`.

They share the transformers machinery: `model_inputs` reads what the data pipeline must match (image size,
normalisation) without loading weights; `load_vit_config` the architecture; `build_vit` loads the network
(`from_pretrained`). Each raises `ConfigError` naming `model.name_or_path` when the checkpoint cannot be
found.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import Tensor, nn
from transformers import (
    AutoImageProcessor,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2ForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.utils import is_flash_attn_2_available
from transformers.utils import logging as hf_logging

from vitcrs.data.inputs import ModelInputs
from vitcrs.errors import ConfigError

from .family import ModelFamily, square_side

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")
DEFAULT_MEAN_STD = (0.5, 0.5, 0.5)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_attn_implementation(attn_implementation: Any) -> None:
    """ConfigError unless `attn_implementation` is one of ATTN_IMPLEMENTATIONS and usable here."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(
            f"model.attn_implementation={attn_implementation!r} is unknown: choose one of "
            f"{', '.join(ATTN_IMPLEMENTATIONS)}, e.g. model.attn_implementation=eager (needed to sample the "
            "attention matmuls)."
        )
    if attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
        raise ConfigError(
            "model.attn_implementation='flash_attention_2' needs the flash-attn package and a CUDA GPU, "
            "which this environment lacks: pip install flash-attn on a CUDA machine, or choose "
            "model.attn_implementation=sdpa (or eager, needed to sample the attention matmuls)."
        )


def _local_dir(name_or_path: str) -> Path | None:
    """`name_or_path` as an existing local checkpoint directory, None if it must be a Hub id.

    Raises ConfigError for a path that does not exist (or lacks config.json) and cannot be a Hub id.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.name_or_path={name_or_path!r} is a directory without config.json: point it at a "
                "Hugging Face checkpoint directory (config.json + model.safetensors), e.g. one written by "
                "save_pretrained."
            )
        return path
    if path.exists() or not _HUB_ID.match(name_or_path) or name_or_path.startswith((".", "~")):
        raise ConfigError(
            f"model.name_or_path={name_or_path!r}: no such checkpoint directory, and it is not a Hugging "
            "Face Hub id (owner/name). Give an existing local directory (config.json + model.safetensors) "
            "or a Hub id such as google/vit-base-patch16-224-in21k."
        )
    return None


def _hub_error(name_or_path: str, err: Exception) -> ConfigError:
    first_line = str(err).splitlines()[0] if str(err) else ""
    return ConfigError(
        f"model.name_or_path={name_or_path!r}: not a local directory, so it was fetched from the Hugging "
        f"Face Hub, which failed ({type(err).__name__}: {first_line}). Connect to the internet once (files "
        "are cached), or download the checkpoint elsewhere and set model.name_or_path=/path/to/checkpoint."
    )


def model_inputs(
    name_or_path: str | None, config: dict | None = None, config_class: type[PretrainedConfig] = ViTConfig
) -> ModelInputs:
    """Image and patch size (from the model config), mean/std (preprocessor_config.json; 0.5 when absent).

    Reads only small JSON files (from the Hub cache for Hub ids). `config` overrides, e.g. image_size, win;
    `config_class`: the family's config (its defaults for random init).
    """
    if config is not None and not isinstance(config, dict):
        raise ConfigError(
            f"model.config={config!r} is invalid: it must be a mapping of {config_class.__name__} fields or "
            "null."
        )
    config = dict(config or {})
    defaults = config_class()
    if name_or_path is None:
        if not config:
            raise ConfigError(
                "model.name_or_path is null and model.config is empty: give a checkpoint "
                "(model.name_or_path=...) or the architecture of a random-init network (model.config)."
            )
        size = config.get("image_size", defaults.image_size)
        patch = config.get("patch_size", defaults.patch_size)
        return ModelInputs(square_side(size), DEFAULT_MEAN_STD, DEFAULT_MEAN_STD, square_side(patch))
    local = _local_dir(name_or_path)
    if local is not None:
        saved = json.loads((local / "config.json").read_text())
        size = config.get("image_size", saved.get("image_size", defaults.image_size))
        patch = config.get("patch_size", saved.get("patch_size", defaults.patch_size))
        pre = local / "preprocessor_config.json"
        processor = json.loads(pre.read_text()) if pre.is_file() else {}
    else:
        try:
            hub = config_class.from_pretrained(name_or_path)
        except OSError as err:
            raise _hub_error(name_or_path, err) from err
        size = config.get("image_size", hub.image_size)
        patch = config.get("patch_size", hub.patch_size)
        try:  # config.json came through, so a failure here means the checkpoint has no preprocessor file
            p = AutoImageProcessor.from_pretrained(name_or_path)
            processor = {"image_mean": p.image_mean, "image_std": p.image_std}
        except OSError:
            processor = {}
    if "image_mean" not in processor:
        log.warning("%s has no preprocessor_config.json: normalising with mean = std = 0.5", name_or_path)
    mean = tuple(float(m) for m in processor.get("image_mean", DEFAULT_MEAN_STD))
    std = tuple(float(s) for s in processor.get("image_std", DEFAULT_MEAN_STD))
    return ModelInputs(square_side(size), mean, std, square_side(patch))


def load_vit_config(
    name_or_path: str | None,
    num_labels: int,
    config: dict | None = None,
    config_class: type[PretrainedConfig] = ViTConfig,
) -> PretrainedConfig:
    """The config `build_vit` would build (the checkpoint's config.json with `config` on top, as a
    `config_class`), read without loading weights. Raises ConfigError as `model_inputs` does."""
    config = {**(config or {}), "num_labels": num_labels}
    local = _local_dir(name_or_path) if name_or_path is not None else None
    try:
        if name_or_path is None:
            return config_class(**config)
        return config_class.from_pretrained(str(local) if local is not None else name_or_path, **config)
    except OSError as err:
        raise _hub_error(name_or_path, err) from err
    except StrictDataclassError as err:  # a field of the wrong type
        why = str(err).strip().splitlines()[-1].strip()
        raise ConfigError(
            f"model.config is invalid for {config_class.__name__}: {why}. Fix the value."
        ) from err


def build_vit(
    name_or_path: str | None,
    num_labels: int,
    attn_implementation: str = "eager",
    config: dict | None = None,
    class_names: list[str] | None = None,
    model_class: type[PreTrainedModel] = ViTForImageClassification,
) -> PreTrainedModel:
    """A `model_class` (default `ViTForImageClassification`) with a fresh `num_labels`-way head.

    name_or_path: local checkpoint directory or Hub id; its encoder weights are loaded and the classifier is
        re-initialised (`ignore_mismatched_sizes=True`). None: random init from `model_class.config_class`.
    config: config fields; the architecture for random init, overrides (e.g. dropout) for a checkpoint.
    class_names: label names stored in the config's id2label (default LABEL_i).
    Raises ConfigError when the checkpoint cannot be found or fetched.
    """
    check_attn_implementation(attn_implementation)
    names = list(class_names) if class_names is not None else [f"LABEL_{i}" for i in range(num_labels)]
    if len(names) != num_labels:
        raise ValueError(f"build_vit got {len(names)} class names for num_labels={num_labels}")
    labels = {
        "num_labels": num_labels,
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }
    config = dict(config or {})
    if name_or_path is None:
        net_config = model_class.config_class(**{**config, **labels})
        net_config._attn_implementation = attn_implementation
        return model_class(net_config)

    _local_dir(name_or_path)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report is replaced by the summary below
    hf_logging.disable_progress_bar()
    try:
        model, info = model_class.from_pretrained(
            name_or_path,
            ignore_mismatched_sizes=True,
            attn_implementation=attn_implementation,
            output_loading_info=True,
            **config,
            **labels,
        )
    except OSError as err:
        raise _hub_error(name_or_path, err) from err
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:  # put back what the caller had: bars they disabled stay off
            hf_logging.enable_progress_bar()
    _report_loading(name_or_path, info, hf_head_prefixes(model))
    return model


def vit_logits(net: PreTrainedModel, pixel_values: Tensor) -> Tensor:
    """Logits [B, num_labels] of a Hugging Face image classifier `net` for normalised images [B, 3, S, S].

    S may differ from the model's own image size (a multiple of its patch size): the position embeddings are
    then interpolated to the new patch grid (Hugging Face's `interpolate_pos_encoding` where the class takes
    it; DINOv2 always interpolates; at the model's own size they are used as they are). DeiT with teacher:
    the mean of its two heads, as transformers computes it.
    """
    if _takes_interpolate(type(net)):
        return net(pixel_values=pixel_values, interpolate_pos_encoding=True).logits
    return net(pixel_values=pixel_values).logits


def _takes_interpolate(cls: type[nn.Module]) -> bool:
    return "interpolate_pos_encoding" in inspect.signature(cls.forward).parameters


def hf_head_prefixes(net: PreTrainedModel) -> tuple[str, ...]:
    """Parameter-name prefixes of the classifier head(s) of a transformers classifier: its children other
    than the base model (e.g. "classifier."; DeiT with teacher: "cls_classifier.",
    "distillation_classifier.")."""
    base = getattr(net, net.base_model_prefix, None)
    return tuple(
        f"{name}."
        for name, child in net.named_children()
        if child is not base and any(True for _ in child.parameters())
    )


def _report_loading(name_or_path: str, info: dict, head: tuple[str, ...]) -> None:
    """One log line for the expected fresh head; a warning for encoder weights that were not loaded."""
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])]
    fresh = [k for k in [*info.get("missing_keys", []), *mismatched] if not k.startswith(head)]
    if fresh:
        log.warning(
            "%s: %d encoder weights were NOT loaded from the checkpoint and are random: %s",
            name_or_path,
            len(fresh),
            ", ".join(sorted(fresh)[:10]),
        )
    unused = sorted(info.get("unexpected_keys", []))
    log.info(
        "Loaded %s with a fresh classifier head%s",
        name_or_path,
        f" (unused checkpoint weights: {', '.join(unused[:10])})" if unused else "",
    )


class HFFamily(ModelFamily):
    """A transformers `<Model>ForImageClassification` (the `hf_vit` family; subclasses for DeiT, DINOv2).

    model.name_or_path: a local checkpoint directory or a Hub id (null: random init from model.config);
    model.attn_implementation: one of ATTN_IMPLEMENTATIONS; model.config: config fields (the architecture for
    random init, overrides such as dropout for a checkpoint).
    """

    name = "hf_vit"
    title = "Hugging Face ViT"
    keys = ("family", "name_or_path", "attn_implementation", "config")
    config_class: type[PretrainedConfig] = ViTConfig
    model_classes: tuple[type[PreTrainedModel], ...] = (ViTForImageClassification,)
    prefix_tokens = 1  # [CLS]

    def model_class(self, model: Mapping[str, Any]) -> type[PreTrainedModel]:
        """The classifier class the `model` node builds."""
        return self.model_classes[0]

    def check(self, model: Mapping[str, Any]) -> None:
        super().check(model)
        check_attn_implementation(model.get("attn_implementation", "eager"))
        config = model.get("config")
        if config is not None and not isinstance(config, Mapping):
            raise ConfigError(
                f"model.config={config!r} is invalid: it must be a mapping of "
                f"{self.config_class.__name__} fields or null."
            )
        unknown = sorted(k for k in config or {} if not self.accepts_config_key(k))
        if unknown:
            raise ConfigError(
                f"model.config has {unknown}, which are not {self.config_class.__name__} fields "
                f"(model.family={self.name}): fix the names, or drop them."
            )

    def missing_message(self, key: str) -> str:
        if key != "name_or_path":
            return super().missing_message(key)
        return (
            "model.name_or_path is missing (???): this model needs a checkpoint. Give a local directory or a "
            "Hub id, e.g. model.name_or_path=/path/to/vit-tiny-patch16-224 or "
            "model.name_or_path=WinKawaks/vit-tiny-patch16-224."
        )

    def accepts_config_key(self, name: str) -> bool:
        return hasattr(self.config_class(), name)

    def weights_source(self, model: Mapping[str, Any]) -> str | None:
        return model.get("name_or_path")

    def inputs(self, model: Mapping[str, Any]) -> ModelInputs:
        return model_inputs(model.get("name_or_path"), _plain(model.get("config")), self.config_class)

    def meta_net(self, model: Mapping[str, Any], num_labels: int) -> nn.Module:
        config = load_vit_config(
            model.get("name_or_path"), num_labels, _plain(model.get("config")), self.config_class
        )
        with torch.device("meta"):
            return self.model_class(model)(config)

    def build(self, model: Mapping[str, Any], num_labels: int, class_names: list[str] | None = None,
              image_size: int | None = None) -> nn.Module:  # fmt: skip
        """`build_vit` of the node; another `image_size` than the model's is interpolated in `logits`."""
        net = build_vit(
            model.get("name_or_path"),
            num_labels,
            model.get("attn_implementation", "eager"),
            _plain(model.get("config")),
            class_names,
            self.model_class(model),
        )
        self.freeze_unused(net)
        return net

    def freeze_unused(self, net: nn.Module) -> None:
        """Stop the parameters a classifier never gives a gradient (data-parallel training would wait for
        one) from training: none in most families."""

    def logits(self, net: nn.Module, pixel_values: Tensor) -> Tensor:
        return vit_logits(net, pixel_values)

    def head_prefixes(self, net: nn.Module) -> tuple[str, ...]:
        return hf_head_prefixes(net)

    def owns(self, net: nn.Module) -> bool:
        return isinstance(net, self.model_classes)

    def grid(self, net: nn.Module) -> tuple[int, int, int]:
        return square_side(net.config.image_size), square_side(net.config.patch_size), self.prefix_tokens


class HFDeiTFamily(HFFamily):
    """transformers DeiT (`hf_deit`): class and distillation token; model.with_teacher: both heads
    (`DeiTForImageClassificationWithTeacher`, logits their mean), else the class-token head alone."""

    name = "hf_deit"
    title = "Hugging Face DeiT"
    keys = (*HFFamily.keys, "with_teacher")
    config_class = DeiTConfig
    model_classes = (DeiTForImageClassification, DeiTForImageClassificationWithTeacher)
    prefix_tokens = 2  # [CLS] and the distillation token

    def model_class(self, model: Mapping[str, Any]) -> type[PreTrainedModel]:
        return self.model_classes[1] if model.get("with_teacher") else self.model_classes[0]

    def check(self, model: Mapping[str, Any]) -> None:
        super().check(model)
        if not isinstance(model.get("with_teacher", False), bool):
            raise ConfigError(
                f"model.with_teacher={model.get('with_teacher')!r} is invalid: true (both heads, logits "
                "their mean) or false (the class-token head)."
            )


class HFDinov2Family(HFFamily):
    """transformers DINOv2 (`hf_dinov2`): layer scale, drop path, an MLP or a SwiGLU MLP (use_swiglu_ffn);
    the head reads the class token and the mean patch token; position embeddings always interpolate."""

    name = "hf_dinov2"
    title = "Hugging Face DINOv2"
    config_class = Dinov2Config
    model_classes = (Dinov2ForImageClassification,)

    def freeze_unused(self, net: nn.Module) -> None:
        """The mask token: only masked-image pre-training reads it."""
        net.dinov2.embeddings.mask_token.requires_grad_(False)


def _plain(config: Any) -> dict | None:
    """A `model.config` value as a dict (or as it is, for `model_inputs` to refuse)."""
    return dict(config) if isinstance(config, Mapping) else config
