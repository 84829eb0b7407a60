"""`python -m vitcrs.fidelity [key=value ...]`: the gradient-fidelity meter, a Hydra app (conf/fidelity.yaml).

Validates every setting (ConfigError, exit status 2, before anything is loaded or written), builds the model
(its model family's `build`, seeded head) and the data (`vitcrs.train.build_datamodule`, the training split
without augmentation: noise_batches + warmup_steps disjoint batches of data.batch_size images drawn with
`seed`), runs `vitcrs.fidelity.meter.measure` with a progress bar, and writes fidelity.json, fidelity.md and
fidelity.png into `out_dir` (Hydra's run dir).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shlex
from pathlib import Path
from typing import Any

import hydra
import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

import vitcrs
from vitcrs.conf import CONF_DIR, choice, container
from vitcrs.crs import CRSConfig, target_set, validate_targets
from vitcrs.errors import ConfigError
from vitcrs.models import check_architecture, model_family, model_label

from .meter import Batch, Configuration, measure, passes_needed
from .render import fidelity_markdown, number, write_plot

log = logging.getLogger(__name__)

CONFIG_KEYS = ("method", "targets", "ratio", "prob", "min_k", "grad_ema", "budget")
OUTPUT_FILES = ("fidelity.json", "fidelity.md", "fidelity.png")


def _int_at_least(cfg: DictConfig, key: str, lo: int, hint: str) -> int:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{key}={value!r} is invalid: it must be an integer >= {lo}. {hint}")
    return value


def configurations(cfg: DictConfig) -> list[Configuration]:
    """The `fidelity.configs` list as Configurations; ConfigError naming the entry and key on a bad one."""
    raw = (
        OmegaConf.to_container(cfg.fidelity.configs, resolve=True)
        if cfg.fidelity.configs is not None
        else None
    )
    example = "e.g. 'fidelity.configs=[{method: crs, targets: study, ratio: 0.3, prob: norm}]'"
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            f"fidelity.configs={raw!r} is invalid: give a non-empty list of CRS settings, {example}."
        )
    out = []
    for i, entry in enumerate(raw):
        where = f"fidelity.configs[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}={entry!r} is invalid: each entry is a mapping, {example}.")
        unknown = sorted(set(entry) - set(CONFIG_KEYS))
        missing = [k for k in ("targets", "ratio") if k not in entry]
        if unknown or missing:
            raise ConfigError(
                f"{where}={entry!r}: {f'unknown keys {unknown}' if unknown else f'missing {missing}'}; "
                f"the keys are {', '.join(CONFIG_KEYS)} (targets and ratio required), {example}."
            )
        targets = entry["targets"]
        named = isinstance(targets, str)  # a set of vitcrs.crs.TARGET_SETS
        if not named and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            raise ConfigError(
                f"{where}.targets={targets!r} is invalid: give a target set (e.g. study, lean) or a list of "
                "names (e.g. [query,key])."
            )
        try:
            targets = target_set(targets) if named else targets
            targets = validate_targets(targets, cfg.model.get("attn_implementation"))
            # the keys not given take CRSConfig's defaults; those that change nothing are put at theirs too
            # (e.g. prob for the lean block), so each row is labelled with what it measures
            crs = CRSConfig(**{**entry, "targets": targets}).in_effect()
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from err
        fields = {k: v for k, v in crs.to_dict().items() if k in CONFIG_KEYS}  # (the cache keys: defaults)
        out.append(Configuration(**{**fields, "targets": crs.targets}))
    return out


def validate(cfg: DictConfig) -> tuple[list[Configuration], torch.device]:
    """Check the meter's own settings; returns the configurations and the device. Raises ConfigError."""
    _int_at_least(cfg, "seed", 0, "e.g. seed=1.")
    model_family(container(cfg.model))
    configs = configurations(cfg)
    _int_at_least(cfg, "fidelity.draws", 3, "The bias check needs several draws, e.g. fidelity.draws=8.")
    _int_at_least(
        cfg, "fidelity.noise_batches", 2, "The minibatch noise needs several, e.g. fidelity.noise_batches=4."
    )
    warmup = _int_at_least(cfg, "fidelity.warmup_steps", 0, "e.g. fidelity.warmup_steps=50 (0: none).")
    _int_at_least(cfg, "fidelity.prime_passes", 0, "e.g. fidelity.prime_passes=3 (0: none).")
    alpha = cfg.fidelity.bias_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ConfigError(f"fidelity.bias_alpha={alpha!r} is invalid: it must be in (0, 1), e.g. 0.001.")
    lr = cfg.optim.lr
    if warmup and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ConfigError(
            f"optim.lr={lr!r} is invalid for the warm-up steps: it must be > 0, e.g. optim.lr=5e-5."
        )
    name = cfg.fidelity.device
    if name == "auto":
        return configs, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"fidelity.device={name!r} is invalid: use auto, cpu, cuda or cuda:N.") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"fidelity.device={name!r}: CUDA is not available here; use fidelity.device=cpu.")
    return configs, device


def check_sampled(configs: list[Configuration], vit: Any, image_size: int, batch_size: int) -> None:
    """ConfigError naming the `fidelity.configs` entry whose row would be exact yet labelled with its ratio
    (no targets, or min_k keeping every pair):
    `CRSConfig.check_sampled` for a ViT `vit` fed `batch_size` images of side `image_size`."""
    for i, config in enumerate(configs):
        try:
            config.crs_config.check_sampled(vit, image_size, batch_size)
        except ConfigError as err:
            raise ConfigError(f"fidelity.configs[{i}] ({config.label}): {err}") from None


def make_batches(datamodule: Any, count: int, seed: int, device: torch.device) -> list[Batch]:
    """`count` disjoint batches of data.batch_size training images (a seeded random choice, no
    augmentation), normalised and resized on `device` as in training."""
    datamodule.setup("fit")
    dataset, size = datamodule.train_dataset, int(datamodule.batch_size)
    if count * size > len(dataset):
        raise ConfigError(
            f"fidelity.noise_batches + fidelity.warmup_steps = {count} batches of data.batch_size={size} "
            f"need {count * size} training images, but the training split has {len(dataset)}: lower them."
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    batches = []
    for i in range(count):
        idx = order[i * size : (i + 1) * size]
        batch = (dataset.images[idx].to(device), dataset.labels[idx].to(device))
        batches.append(datamodule.on_after_batch_transfer(batch, 0))
    return batches


def _command() -> str:
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return "python -m vitcrs.fidelity " + shlex.join(overrides)


def finite_or_none(value: Any) -> Any:
    """`value` with every NaN/inf float inside dicts and lists replaced by None (valid JSON; e.g. the
    relative error of a block whose exact gradient is zero)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def run(cfg: DictConfig) -> Path:
    """Measure as configured and write the three files into cfg.out_dir; returns that folder."""
    from vitcrs.train import build_datamodule
    from vitcrs.trainer import quiet_known_warnings

    quiet_known_warnings()
    configs, device = validate(cfg)
    model_node = container(cfg.model)
    family = model_family(model_node)
    datamodule = build_datamodule(cfg, family=family)
    arch = family.meta_architecture(model_node, datamodule.num_classes)
    check_architecture(arch, int(datamodule.image_size))
    check_sampled(configs, arch, int(datamodule.image_size), int(datamodule.batch_size))
    f = cfg.fidelity
    batches = make_batches(datamodule, f.noise_batches + f.warmup_steps, cfg.seed, device)
    torch.manual_seed(cfg.seed)  # the fresh head
    model = family.build(
        model_node, datamodule.num_classes, list(datamodule.class_names), int(datamodule.image_size)
    ).to(device)
    total = passes_needed(configs, f.draws, f.prime_passes, f.noise_batches, f.warmup_steps)
    columns = (
        TextColumn("{task.description:<56.56}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns) as progress:
        task = progress.add_task("forward + backward passes", total=total)
        results = measure(
            model,
            batches[: f.noise_batches],
            configs,
            draws=f.draws,
            prime_passes=f.prime_passes,
            seed=cfg.seed,
            warmup_batches=batches[f.noise_batches :],
            lr=float(cfg.optim.lr),
            weight_decay=float(cfg.optim.weight_decay),
            alpha=float(f.bias_alpha),
            tick=lambda phase: progress.update(task, advance=1, description=phase),
        )
    results = {
        "command": _command(),
        "settings": {
            "model": model_label(model_node, choice("model")),
            "family": family.name,
            "attn_implementation": model_node.get("attn_implementation", "eager"),
            "dataset": datamodule.name,
            "num_classes": datamodule.num_classes,
            "batch_size": int(datamodule.batch_size),
            "image_size": int(datamodule.image_size),
            "seed": cfg.seed,
            "draws": f.draws,
            "noise_batches": f.noise_batches,
            "warmup_steps": f.warmup_steps,
            "lr": float(cfg.optim.lr) if f.warmup_steps else None,
            "prime_passes": f.prime_passes,
            "bias_alpha": float(f.bias_alpha),
            "device": str(device),
            "threads": torch.get_num_threads(),
        },
        "versions": {
            "vitcrs": vitcrs.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        **results,
    }
    results = finite_or_none(results)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "fidelity.md").write_text(fidelity_markdown(results), encoding="utf-8")
    write_plot(results, out / "fidelity.png")
    noise = number(results["exact"]["noise"])
    for c in results["configurations"]:
        log.info(
            "%s: rel. error %s (%sx the minibatch noise %s), cos %s%s",
            c["label"], number(c["rel_err"]["mean"]), number(c["err_over_noise"]), noise,
            number(c["cos"]["mean"]), ", BIASED" if c["bias"]["biased"] else "",
        )  # fmt: skip
    log.info("fidelity.json, fidelity.md, fidelity.png in %s", out.resolve())
    return out


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="fidelity")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as err:
        log.error("%s", err)
        raise SystemExit(2) from None
