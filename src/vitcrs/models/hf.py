"""Building the Hugging Face ViT: from a checkpoint with a fresh classifier head, or randomly initialised.

`model_inputs` reads what the data pipeline must match (image size, normalisation) without loading weights;
`build_vit` loads the network. Both raise `ConfigError` naming `model.name_or_path` when the checkpoint cannot
be found.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoImageProcessor, ViTConfig, ViTForImageClassification
from transformers.utils import is_flash_attn_2_available
from transformers.utils import logging as hf_logging

from vitcrs.errors import ConfigError

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")
DEFAULT_MEAN_STD = (0.5, 0.5, 0.5)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HEAD_PREFIX = "classifier."  # parameter names of the classifier head (re-initialised per task)


@dataclass(frozen=True)
class ModelInputs:
    """What the network expects of its input: its square side in pixels (the checkpoint's), per-channel
    normalisation, and the patch side (another input side must be a multiple of it)."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    patch_size: int = 16

    def check_image_size(self, size: Any) -> None:
        """ConfigError unless `size` (data.image_size) is a positive multiple of the patch side.

        Another size than the checkpoint's is fine-tuned with interpolated position embeddings (Hugging
        Face's `interpolate_pos_encoding`, `vit_logits`); the image must still cut into whole patches.
        """
        patch = self.patch_size
        whole = isinstance(size, int) and not isinstance(size, bool)
        if whole and size >= 1 and not size % patch:
            return
        below = max(patch, size // patch * patch) if whole else 0
        example = f"data.image_size={below} or {below + patch}" if below else f"data.image_size={patch * 14}"
        raise ConfigError(
            f"data.image_size={size!r} is invalid: it must be a positive multiple of the model's patch size "
            f"{patch} (the model cuts images into {patch}x{patch} patches; its checkpoint size is "
            f"{self.image_size}). Fix: e.g. {example}, or data.image_size=null for the model's own size."
        )


def _side(size: Any) -> int:
    """A ViTConfig image_size (int or [h, w]) as one side; non-square sizes are refused."""
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConfigError(f"model image_size={list(size)} is not square: vitcrs feeds square images.")
        size = size[0]
    return int(size)


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


def model_inputs(name_or_path: str | None, config: dict | None = None) -> ModelInputs:
    """Image and patch size (from the model config), mean/std (preprocessor_config.json; 0.5 when absent).

    Reads only small JSON files (from the Hub cache for Hub ids). `config` overrides, e.g. image_size, win.
    """
    if config is not None and not isinstance(config, dict):
        raise ConfigError(
            f"model.config={config!r} is invalid: it must be a mapping of ViTConfig fields or null."
        )
    config = dict(config or {})
    if name_or_path is None:
        if not config:
            raise ConfigError(
                "model.name_or_path is null and model.config is empty: give a checkpoint "
                "(model.name_or_path=...) or the architecture of a random-init ViT (model.config)."
            )
        patch = _side(config.get("patch_size", ViTConfig().patch_size))
        return ModelInputs(_side(config.get("image_size", 224)), DEFAULT_MEAN_STD, DEFAULT_MEAN_STD, patch)
    local = _local_dir(name_or_path)
    if local is not None:
        saved = json.loads((local / "config.json").read_text())
        size = config.get("image_size", saved.get("image_size", 224))
        patch = config.get("patch_size", saved.get("patch_size", 16))
        pre = local / "preprocessor_config.json"
        processor = json.loads(pre.read_text()) if pre.is_file() else {}
    else:
        try:
            hub = ViTConfig.from_pretrained(name_or_path)
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
    return ModelInputs(_side(size), mean, std, _side(patch))


def load_vit_config(name_or_path: str | None, num_labels: int, config: dict | None = None) -> ViTConfig:
    """The ViTConfig `build_vit` would build (the checkpoint's config.json with `config` on top), read without
    loading weights. Raises ConfigError as `model_inputs` does."""
    config = {**(config or {}), "num_labels": num_labels}
    if name_or_path is None:
        return ViTConfig(**config)
    local = _local_dir(name_or_path)
    try:
        return ViTConfig.from_pretrained(str(local) if local is not None else name_or_path, **config)
    except OSError as err:
        raise _hub_error(name_or_path, err) from err


def parameter_shapes(vit: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of each weight of `ViTForImageClassification(vit)` (built on the meta device)."""
    with torch.device("meta"):
        net = ViTForImageClassification(vit)
    return {name: tuple(t.shape) for name, t in net.state_dict().items()}


def build_vit(
    name_or_path: str | None,
    num_labels: int,
    attn_implementation: str = "eager",
    config: dict | None = None,
    class_names: list[str] | None = None,
) -> ViTForImageClassification:
    """A `ViTForImageClassification` with a fresh `num_labels`-way head.

    name_or_path: local checkpoint directory or Hub id; its encoder weights are loaded and the classifier is
        re-initialised (`ignore_mismatched_sizes=True`). None: random init from `ViTConfig(**config)`.
    config: ViTConfig fields; the architecture for random init, overrides (e.g. dropout) for a checkpoint.
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
        vit_config = ViTConfig(**{**config, **labels})
        vit_config._attn_implementation = attn_implementation
        return ViTForImageClassification(vit_config)

    _local_dir(name_or_path)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report is replaced by the summary below
    hf_logging.disable_progress_bar()
    try:
        model, info = ViTForImageClassification.from_pretrained(
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
    _report_loading(name_or_path, info)
    return model


def vit_logits(net: ViTForImageClassification, pixel_values: Tensor) -> Tensor:
    """Logits [B, num_labels] of `net` for normalised images [B, 3, S, S].

    S may differ from the model's own image size (a multiple of its patch size): the position embeddings are
    then interpolated to the new patch grid (Hugging Face's `interpolate_pos_encoding`; at the model's own
    size they are used as they are).
    """
    return net(pixel_values=pixel_values, interpolate_pos_encoding=True).logits


def _report_loading(name_or_path: str, info: dict) -> None:
    """One log line for the expected fresh head; a warning for encoder weights that were not loaded."""
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])]
    fresh = [k for k in [*info.get("missing_keys", []), *mismatched] if not k.startswith(HEAD_PREFIX)]
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
