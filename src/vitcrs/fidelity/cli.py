"""`python -m vitcrs.fidelity [key=value ...]`: the gradient-fidelity meter, a Hydra app (conf/fidelity.yaml).

The meter's composition root: the only module of the meter that reads the DictConfig. Validates every
setting into typed objects (`MeterSettings`; ConfigError, exit status 2, before anything is loaded or
written), builds the model (its model family's `build`, seeded head) and the data
(`vitcrs.data.build_datamodule`, the training split without augmentation: noise_batches + warmup_steps
disjoint batches of data.batch_size images drawn with `seed`), runs `vitcrs.fidelity.meter.measure` with a
progress bar, and writes fidelity.json, fidelity.md and fidelity.png into `out_dir` (Hydra's run dir).
"""

from __future__ import annotations

import logging
import math
import platform
import shlex
from dataclasses import dataclass
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
from vitcrs.conf import CONF_DIR, choice, container, register
from vitcrs.crs import CRSConfig, target_set, validate_targets
from vitcrs.data import VisionDataModule
from vitcrs.errors import ConfigError, check_int
from vitcrs.files import write_json_atomic, write_text_atomic
from vitcrs.models import Architecture, ModelFamily, OptimConfig, model_family, model_label
from vitcrs.settings import MAX_SEED, model_data
from vitcrs.trainer import quiet_known_warnings

from .meter import Batch, Configuration, measure, passes_needed
from .render import fidelity_markdown, number, write_plot

# conf/ needs its resolvers and the crs defaults node before Hydra composes it (as vitcrs.train)
register()
log = logging.getLogger(__name__)

CONFIG_KEYS = ("method", "targets", "ratio", "prob", "min_k", "grad_ema", "budget", "keep_dtype")
OUTPUT_FILES = ("fidelity.json", "fidelity.md", "fidelity.png")


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


@dataclass(frozen=True)
class MeterSettings:
    """The meter's settings, checked (`validate`): the model node and its family, the checked (unprepared)
    data module and the network's architecture, the configurations, the measurement's counts, the warm-up's
    optimizer settings and the device."""

    seed: int
    model: dict[str, Any]
    family: ModelFamily
    datamodule: VisionDataModule
    arch: Architecture
    configs: list[Configuration]
    draws: int
    noise_batches: int
    warmup_steps: int
    prime_passes: int
    bias_alpha: float
    optim: OptimConfig
    device: torch.device


def validate(cfg: DictConfig) -> MeterSettings:
    """Check every setting of the meter, without loading weights or decoding images. Raises ConfigError."""
    seed = check_int("seed", cfg.seed, 0, MAX_SEED, example=1)
    model = container(cfg.model)
    family = model_family(model)
    configs = configurations(cfg)
    f = container(cfg.fidelity)
    draws = check_int("fidelity.draws", f["draws"], 3, example=8)  # the bias check needs several draws
    noise = check_int("fidelity.noise_batches", f["noise_batches"], 2, example=4)  # the noise needs several
    warmup = check_int("fidelity.warmup_steps", f["warmup_steps"], 0, example=50)
    prime = check_int("fidelity.prime_passes", f["prime_passes"], 0, example=3)
    alpha = f["bias_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ConfigError(f"fidelity.bias_alpha={alpha!r} is invalid: it must be in (0, 1), e.g. 0.001.")
    optim = OptimConfig.from_settings(container(cfg.optim))  # lr and weight_decay of the warm-up steps
    device = _device(f["device"])
    datamodule, arch = model_data(family, model, container(cfg.data))
    check_sampled(configs, arch, int(datamodule.image_size), int(datamodule.batch_size))
    return MeterSettings(
        seed,
        model,
        family,
        datamodule,
        arch,
        configs,
        draws,
        noise,
        warmup,
        prime,
        float(alpha),
        optim,
        device,
    )


def _device(name: Any) -> torch.device:
    """The device of fidelity.device: auto (cuda if available, else cpu), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"fidelity.device={name!r} is invalid: use auto, cpu, cuda or cuda:N.") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"fidelity.device={name!r}: CUDA is not available here; use fidelity.device=cpu.")
    return device


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
    quiet_known_warnings()
    m = validate(cfg)
    datamodule = m.datamodule
    batches = make_batches(datamodule, m.noise_batches + m.warmup_steps, m.seed, m.device)
    torch.manual_seed(m.seed)  # the fresh head
    model = m.family.build(
        m.model, datamodule.num_classes, list(datamodule.class_names), int(datamodule.image_size)
    ).to(m.device)
    total = passes_needed(m.configs, m.draws, m.prime_passes, m.noise_batches, m.warmup_steps)
    columns = (
        TextColumn("{task.description:<56.56}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns) as progress:
        task = progress.add_task("forward + backward passes", total=total)
        results = measure(
            model,
            batches[: m.noise_batches],
            m.configs,
            draws=m.draws,
            prime_passes=m.prime_passes,
            seed=m.seed,
            warmup_batches=batches[m.noise_batches :],
            lr=m.optim.lr,
            weight_decay=m.optim.weight_decay,
            alpha=m.bias_alpha,
            tick=lambda phase: progress.update(task, advance=1, description=phase),
        )
    results = {
        "command": _command(),
        "settings": {
            "model": model_label(m.model, choice("model")),
            "family": m.family.name,
            "attn_implementation": m.model.get("attn_implementation", "eager"),
            "dataset": datamodule.name,
            "num_classes": datamodule.num_classes,
            "batch_size": int(datamodule.batch_size),
            "image_size": int(datamodule.image_size),
            "seed": m.seed,
            "draws": m.draws,
            "noise_batches": m.noise_batches,
            "warmup_steps": m.warmup_steps,
            "lr": m.optim.lr if m.warmup_steps else None,
            "prime_passes": m.prime_passes,
            "bias_alpha": m.bias_alpha,
            "device": str(m.device),
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
    write_json_atomic(out / "fidelity.json", results)
    write_text_atomic(out / "fidelity.md", fidelity_markdown(results))
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
