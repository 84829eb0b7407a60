"""Train, select and test one run: `python -m vitcrs.train [key=value ...]`; `-m` sweeps (one run per job).

The configuration is the repository's `conf/` (found relative to this file, so vitcrs must be installed
editable, `pip install -e .`, or run from a checkout). Steps:
1. validate every setting (ConfigError naming the key) before anything is downloaded, loaded or written,
   including the checkpoint to resume from (`ckpt_path=last`: <run_dir>/checkpoints/last.ckpt);
2. seed everything (CRS sampling: seed + rank, set by the LightningModule once the rank is known), and make
   the training data a function of (seed, epoch, step, rank) that checkpoints can resume mid-epoch;
3. fit with AdamW, checkpointing last.ckpt and the best val/acc; test the best checkpoint on the test split;
4. keep `<run_dir>/metrics.json` current throughout (incomplete / complete / failed), written by rank 0.
Data parallel (`trainer=ddp`, `trainer=fsdp`): Lightning starts the other processes of a single run by running
this command again in the same run dir; in a `-m` sweep the processes must come from the cluster (SLURM).
Returns the best validation accuracy, for Hydra sweepers.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import signal
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning
import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.fabric.strategies.launchers.subprocess_script import (
    _SubprocessScriptLauncher as FabricSubprocessLauncher,
)
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue
from transformers import ViTConfig

import vitcrs
from vitcrs.callbacks import METRICS_KEYS, CheckpointOnSigterm, MetricsFile, write_json_atomic
from vitcrs.crs import MATMUL_TARGETS, CRSConfig, target_set, validate_targets
from vitcrs.errors import ConfigError
from vitcrs.models import (
    ModelInputs,
    ViTClassifier,
    check_attn_implementation,
    load_vit_config,
    model_inputs,
    parameter_shapes,
)
from vitcrs.resume import (
    LAST,
    check_checkpoint,
    checkpoint_epochs,
    checkpoint_run_dir,
    hydra_output_subdir,
    last_checkpoint,
    resolve_ckpt_path,
    resumable_train_data,
)
from vitcrs.run_dir import (
    RunAlreadyComplete,
    RunDirInUse,
    RunDirLock,
    check_run_dir,
    keep_complete_record,
)

log = logging.getLogger(__name__)

# conf/config.yaml: hydra.run.dir follows ckpt_path into its run dir; a re-used run dir keeps its .hydra/.
OmegaConf.register_new_resolver("vitcrs.run_dir", checkpoint_run_dir, use_cache=True, replace=True)
OmegaConf.register_new_resolver("vitcrs.hydra_subdir", hydra_output_subdir, use_cache=True, replace=True)
# conf/ablation, conf/experiment: `crs.targets: ${vitcrs.targets:study}` names a set of vitcrs.crs.TARGET_SETS
# (a ListConfig, so that OmegaConf.resolve, e.g. `--cfg job --resolve`, can put the list in place)
OmegaConf.register_new_resolver("vitcrs.targets", lambda name: ListConfig(target_set(name)), replace=True)


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _number(
    cfg: DictConfig, key: str, lo: float, hi: float | None, hint: str, closed_hi: bool = False
) -> None:
    """ConfigError unless OmegaConf.select(cfg, key) is a finite number in [lo, hi) ([lo, hi]: closed_hi)."""
    value = OmegaConf.select(cfg, key)
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= lo
    )
    if ok and hi is not None:
        ok = value <= hi if closed_hi else value < hi
    if not ok:
        span = f"[{lo}, {hi}{']' if closed_hi else ')'}" if hi is not None else f">= {lo}"
        raise ConfigError(f"{key}={value!r} is invalid: it must be a number {span}. {hint}")


def _model_inputs(cfg: DictConfig) -> ModelInputs:
    try:
        name_or_path = cfg.model.name_or_path
    except MissingMandatoryValue as err:
        raise ConfigError(
            "model.name_or_path is missing (???): this model needs a checkpoint. Give a local directory or a "
            "Hub id, e.g. model.name_or_path=/path/to/vit-tiny-patch16-224 or "
            "model.name_or_path=WinKawaks/vit-tiny-patch16-224."
        ) from err
    config = _container(cfg.model.config)
    if config is not None and not isinstance(config, dict):
        raise ConfigError(
            f"model.config={config!r} is invalid: it must be a mapping of ViTConfig fields or null."
        )
    return model_inputs(name_or_path, config)


MAX_SEED = 2**32 - 1  # the largest seed Lightning's seed_everything takes (numpy's limit)
# Nodes whose added keys (`+trainer.accumulate_grad_batches=2`, `+callbacks.x._target_=...`) go to
# constructors that refuse unknown arguments themselves; a key added anywhere else would be read by nothing.
ADDABLE_NODES = ("trainer", "callbacks", "logger", "hydra")


def check_added_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """ConfigError for a `+key=value` override adding a key that nothing reads (it would be silently ignored).

    Allowed: config groups (`+experiment=...`), keys under ADDABLE_NODES, arguments of a node's `_target_`
    (`+data.num_classes=...`), and ViTConfig fields under model.config. The message lists the keys known
    where the new one was added.
    """
    groups = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    for override in OverridesParser.create().parse_overrides(overrides):
        if not override.is_add():  # `++key` may set a key that exists; only `+key` surely adds one
            continue
        key = override.key_or_group
        if "/" in key or key in groups or key.split(".")[0] in ADDABLE_NODES:
            continue
        parent, _, name = key.rpartition(".")
        if parent == "model.config" and hasattr(ViTConfig(), name):
            continue
        node = OmegaConf.select(cfg, parent) if parent else cfg
        known = {str(k) for k in node if k != name} if isinstance(node, DictConfig) else set()
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if isinstance(target, str):  # a node instantiated as `target`: its arguments are read
            known |= set(inspect.signature(get_class(target)).parameters) - {"self", "args", "kwargs"}
            if name in known:
                continue
        known.discard("_target_")
        where = f"under {parent}" if parent else "at the top level"
        raise ConfigError(
            f"{override.input_line}: vitcrs reads no key {key!r}, so it would be silently ignored. Known "
            f"keys {where}: {', '.join(sorted(known))}. Fix the name (without the +, to change a known key)"
            f"{' or use a ViTConfig field' if parent == 'model.config' else ''}, or drop it."
        )


def _check_trainer_length(cfg: DictConfig) -> None:
    """ConfigError unless the run trains: trainer.max_epochs >= 1 and some training batches per epoch."""
    epochs = cfg.trainer.get("max_epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(
            f"trainer.max_epochs={epochs!r} is invalid: it must be an integer >= 1, e.g. "
            "trainer.max_epochs=3."
        )
    limit = cfg.trainer.get("limit_train_batches")
    share = isinstance(limit, float) and math.isfinite(limit) and 0 < limit <= 1
    count = isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1
    if limit is not None and not (share or count):
        raise ConfigError(
            f"trainer.limit_train_batches={limit!r} is invalid: it must be null (every batch), an integer "
            ">= 1 (batches per epoch) or a share in (0, 1], e.g. trainer.limit_train_batches=0.25; a run "
            "that trains on nothing would be recorded as trained."
        )


def _check_sampling(cfg: DictConfig, targets: list[str], vit: ViTConfig) -> None:
    """ConfigError when crs.ratio < 1 would sample nothing (no targets, or crs.min_k >= every contraction):
    the run would be exact but recorded as sampled."""
    ratio = float(cfg.crs.ratio)
    if ratio >= 1:
        return
    keys = ("hidden_dropout_prob", "attention_probs_dropout_prob")
    dropout = {k: getattr(vit, k, 0.0) or 0.0 for k in keys}
    if "lean_block" in targets and any(p > 0 for p in dropout.values()):
        key, p = next((k, p) for k, p in dropout.items() if p > 0)
        raise ConfigError(
            f"crs.targets=[lean_block] recomputes each block in backward and needs a model without dropout, "
            f"but its config has {key}={p}. Set model.config.{key}=0.0, or sample other targets (e.g. "
            "crs.targets=[query,key,value,attn_output,mlp])."
        )
    if not targets:
        raise ConfigError(
            f"crs.targets=[] samples nothing, so a crs.ratio={ratio} run would be exact yet recorded as "
            "sampled. Give the ops to sample (e.g. crs.targets=[query,key,value]) or crs.ratio=1.0 for an "
            "exact run."
        )
    side = int(cfg.data.image_size) // int(vit.patch_size)
    tokens = side * side + 1
    # The longest contraction a target samples: tokens of the batch for linears, tokens or the head width
    # for the attention matmuls.
    head = int(vit.hidden_size) // int(vit.num_attention_heads)
    longest = max(
        max(tokens, head) if t in MATMUL_TARGETS else int(cfg.data.batch_size) * tokens for t in targets
    )
    if int(cfg.crs.min_k) >= longest:
        raise ConfigError(
            f"crs.min_k={cfg.crs.min_k} keeps every pair of every sampled op (the longest contraction has "
            f"{longest}), so a crs.ratio={ratio} run would be exact yet recorded as sampled. Lower crs.min_k "
            "(default 1) or set crs.ratio=1.0 for an exact run."
        )


def crs_changes(cfg: DictConfig, saved: dict[str, Any] | None) -> dict[str, Any]:
    """The crs.* settings that differ from those of the checkpoint's run (`saved`: its hyperparameters):
    key -> the checkpoint's value."""
    before = (saved or {}).get("crs")
    if not isinstance(before, dict) or not before:  # not saved: nothing to compare with
        return {}
    # A key the checkpoint's run did not have yet (a newer option) took its default there.
    defaults = {f.name: f.default for f in dataclasses.fields(CRSConfig)}
    before = {**{k: v for k, v in defaults.items() if k not in before}, **before}
    now = _container(cfg.crs)
    return {k: before.get(k) for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)}


def _check_image_size(size: Any, inputs: ModelInputs) -> None:
    """ConfigError unless `size` (data.image_size) is a positive multiple of the model's patch side.

    Another size than the checkpoint's is fine-tuned with interpolated position embeddings (Hugging Face's
    `interpolate_pos_encoding`); the image must still cut into whole patches.
    """
    patch = inputs.patch_size
    whole = isinstance(size, int) and not isinstance(size, bool)
    if not whole or size < 1 or size % patch:
        below = max(patch, size // patch * patch) if whole else 0
        example = f"data.image_size={below} or {below + patch}" if below else f"data.image_size={patch * 14}"
        raise ConfigError(
            f"data.image_size={size!r} is invalid: it must be a positive multiple of the model's patch size "
            f"{patch} (the model cuts images into {patch}x{patch} patches; its checkpoint size is "
            f"{inputs.image_size}). Fix: e.g. {example}, or data.image_size=null for the model's own size."
        )


def build_datamodule(cfg: DictConfig) -> Any:
    """The checked (unprepared) datamodule of `cfg.data` for `cfg.model`; raises ConfigError.

    Fills data.image_size / data.mean / data.std from the model where they are null (reads only small files)
    and checks a given data.image_size against the model's patch size.
    """
    inputs = _model_inputs(cfg)
    with open_dict(cfg):
        if cfg.data.get("image_size") is None:
            cfg.data.image_size = inputs.image_size
        else:
            _check_image_size(cfg.data.image_size, inputs)
        if cfg.data.get("mean") is None:
            cfg.data.mean = list(inputs.mean)
        if cfg.data.get("std") is None:
            cfg.data.std = list(inputs.std)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.check()
    return datamodule


def validate(cfg: DictConfig) -> Any:
    """Check every setting without loading weights or data; return the (unprepared) datamodule.

    Fills data.image_size / data.mean / data.std from the model where they are null. Raises ConfigError.
    """
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(
            f"seed={cfg.seed!r} is invalid: it must be an integer in [0, {MAX_SEED}], e.g. seed=1."
        )
    if HydraConfig.initialized():
        check_added_keys(cfg, list(HydraConfig.get().overrides.task))
    crs = dict(_container(cfg.crs))
    targets = crs.pop("targets", None)
    try:
        CRSConfig(**crs)
    except TypeError as err:
        raise ConfigError(
            f"crs has unknown keys ({err}): allowed are ratio, method, targets, min_k, prob, grad_ema, "
            "cache_format, cache_warmup, cache_in_checkpoint."
        ) from err
    except ValueError as err:
        raise ConfigError(f"{err} (see conf/crs/default.yaml)") from err
    attn = cfg.model.attn_implementation
    check_attn_implementation(attn)
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ConfigError(
            f"crs.targets={targets!r} is invalid: it must be a list of names, e.g. [query,key]."
        )
    try:
        validate_targets(targets, attn)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    # AdamW moves each weight by about lr per step: lr >= 1 (or inf) wrecks the weights in a step or two.
    _number(cfg, "optim.lr", 0, 1, "Give a positive learning rate below 1, e.g. optim.lr=5e-5.")
    if cfg.optim.lr == 0:
        raise ConfigError("optim.lr=0 is invalid: it must be > 0, e.g. optim.lr=5e-5.")
    _number(cfg, "optim.weight_decay", 0, None, "e.g. optim.weight_decay=0.01.")
    _number(cfg, "optim.warmup_fraction", 0, 1, "e.g. optim.warmup_fraction=0.1.")
    _check_trainer_length(cfg)
    batch_size = cfg.data.batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"data.batch_size={batch_size!r} is invalid: it must be an integer >= 1, e.g. 64.")
    ckpt_path = cfg.ckpt_path
    if ckpt_path == LAST:  # <run_dir>/checkpoints/last.ckpt if there is one, else a fresh start
        cfg.ckpt_path = resolve_ckpt_path(LAST, cfg.run_dir)
    elif ckpt_path is not None and (not isinstance(ckpt_path, str) or not Path(ckpt_path).is_file()):
        raise ConfigError(
            f"ckpt_path={ckpt_path!r}: no such checkpoint file. Give a run's checkpoint, e.g. "
            "ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt, ckpt_path=last (with "
            "hydra.run.dir=<the run dir>), or ckpt_path=null to start afresh."
        )

    datamodule = build_datamodule(cfg)
    vit = load_vit_config(cfg.model.name_or_path, datamodule.num_classes, _container(cfg.model.config))
    _check_sampling(cfg, targets, vit)
    if cfg.ckpt_path is not None:
        shapes = parameter_shapes(vit)
        saved = check_checkpoint(cfg.ckpt_path, datamodule.num_classes, datamodule.name, shapes)
        changed = crs_changes(cfg, saved)
        if changed and not cfg.allow_crs_change:
            now = {k: _container(cfg.crs).get(k) for k in changed}
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path!r} was trained with other crs settings ({changed}) than this "
                f"run's ({now}): the record would describe neither. Resume with the checkpoint's settings, "
                "or add allow_crs_change=true to continue with the new ones (metrics.json then records the "
                "old ones under settings.crs_before_resume)."
            )
    done = checkpoint_epochs(cfg.ckpt_path) if cfg.ckpt_path is not None else None
    check_run_dir(cfg.run_dir, done, cfg.trainer.max_epochs)
    return datamodule


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


_DROP_LITLOGGER_TIP = _DropLitLoggerTip()  # one instance: addFilter skips it when already added


def quiet_known_warnings() -> None:
    """Silence the notices a normal run triggers that need no action; nothing else."""
    # Lightning suggests more dataloader workers whenever num_workers is small; data.num_workers is explicit.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # Quick runs (few batches per epoch) are told the logging interval exceeds an epoch.
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval.*")
    # Lightning 2.6 still uses torch's deprecated pytree LeafSpec (torch >= 2.10); harmless.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    # Lightning's model summary cannot size bf16/fp16 weights and says so on every mixed-precision run.
    warnings.filterwarnings("ignore", message=r".*is not supported by the model summary.*")
    # Data parallel: val/test are sharded with DistributedSampler, which repeats a few images when a split
    # does not divide by the world size (CIFAR's 5000/10000 divide by 2, 4 and 8); see docs/scaling.md.
    warnings.filterwarnings("ignore", message=r".*it is recommended to use `Trainer\(devices=1, num_nodes=1")
    # Lightning's advertisement for its cloud logger, printed by every Trainer.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DROP_LITLOGGER_TIP)


def _choice(group: str) -> str | None:
    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def describe_run(
    cfg: DictConfig, datamodule: Any, crs_before_resume: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The fields of metrics.json known before training; `crs_before_resume`: the crs settings a resumed
    checkpoint had where they differ (allow_crs_change=true), recorded under settings."""
    crs = cfg.crs
    record = {
        "dataset": datamodule.name,
        "label_type": datamodule.label_type,
        "num_classes": datamodule.num_classes,
        "ratio": float(crs.ratio),
        "method": crs.method,
        "targets": list(crs.targets),
        "seed": cfg.seed,
        "versions": {
            "vitcrs": vitcrs.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lightning": lightning.__version__,
        },
        "settings": {
            "model": cfg.model.name_or_path or _choice("model") or "random-init",
            "attn_implementation": cfg.model.attn_implementation,
            "precision": str(cfg.trainer.precision),
            "batch_size": cfg.data.batch_size,
            "max_epochs": cfg.trainer.max_epochs,
            "lr": cfg.optim.lr,
            "image_size": cfg.data.image_size,
            "method": crs.method,
            "targets": list(crs.targets),
            "prob": crs.prob,
            "limit_train": cfg.data.get("limit_train"),
        },
        "run_dir": str(Path(cfg.run_dir).resolve()),
    }
    if crs_before_resume:
        record["settings"]["crs_before_resume"] = crs_before_resume
    return record


def _keep_csv_logs(loggers: list[Logger]) -> None:
    """On resume, move each CSVLogger's metrics.csv aside (to metrics.segment-N.csv) before it is deleted."""
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        current = Path(logger.log_dir) / "metrics.csv"
        if current.is_file():
            # After the highest segment, not the count: with one removed, the count names a kept one.
            taken = [
                p.name[len("metrics.segment-") : -len(".csv")]
                for p in current.parent.glob("metrics.segment-*.csv")
            ]
            n = 1 + max((int(i) for i in taken if i.isdigit()), default=0)
            current.rename(current.with_name(f"metrics.segment-{n}.csv"))
    warnings.filterwarnings("ignore", message=r".*Previous log files in this directory will be deleted.*")


def _instantiate_all(node: DictConfig | None) -> list[Any]:
    """Instantiate each non-null entry of a name -> config mapping, in order."""
    return [instantiate(c) for c in (node or {}).values() if c is not None]


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _build_trainer(cfg: DictConfig, metrics: MetricsFile) -> tuple[Trainer, list[Logger]]:
    """The callbacks, loggers and Trainer as configured; ConfigError for settings Lightning refuses."""
    try:
        callbacks: list[Callback] = _instantiate_all(cfg.get("callbacks"))
        loggers: list[Logger] = _instantiate_all(cfg.get("logger"))
        on_sigterm = CheckpointOnSigterm(last_checkpoint(cfg.run_dir))  # before metrics: see its docstring
        trainer = instantiate(
            cfg.trainer, callbacks=[*callbacks, on_sigterm, metrics], logger=loggers or False
        )
    except (InstantiationException, MisconfigurationException) as err:
        cause = err.__cause__ or err
        raise ConfigError(
            f"trainer/callbacks/logger settings are refused by Lightning: {type(cause).__name__}: {cause}"
        ) from err
    return trainer, loggers


def _check_processes(trainer: Trainer) -> None:
    """ConfigError for data-parallel launches that cannot work: spawned processes, re-run -m sweeps."""
    strategy = trainer.strategy
    launcher = getattr(strategy, "launcher", None)
    env = getattr(strategy, "cluster_environment", None)
    if launcher is None or trainer.world_size == 1 or (env is not None and env.creates_processes_externally):
        return
    if not isinstance(launcher, (_SubprocessScriptLauncher, FabricSubprocessLauncher)):
        raise ConfigError(
            f"trainer.strategy starts its {trainer.world_size} processes with {type(launcher).__name__}, "
            "which vitcrs does not support: use trainer=ddp or trainer=fsdp (they run the command again per "
            "device)."
        )
    if _multirun():
        raise ConfigError(
            f"trainer.devices x trainer.num_nodes = {trainer.world_size} processes in a -m sweep: Lightning "
            "would start each extra process by re-running the whole sweep. Run data-parallel sweeps with "
            "hydra/launcher=slurm (SLURM starts one task per device), or run each job on its own (no -m)."
        )


def train(cfg: DictConfig) -> float | None:
    """One run as configured (cfg.run_dir must resolve); returns the best val accuracy."""
    quiet_known_warnings()
    datamodule = validate(cfg)
    run_dir = Path(cfg.run_dir)
    seed_everything(cfg.seed, workers=True, verbose=False)

    changed = None
    if cfg.ckpt_path is not None:  # allowed by validate (allow_crs_change=true) where there are any
        changed = crs_changes(cfg, check_checkpoint(cfg.ckpt_path, datamodule.num_classes, datamodule.name))
    metrics = MetricsFile(run_dir / "metrics.json", describe_run(cfg, datamodule, changed))
    trainer, loggers = _build_trainer(cfg, metrics)
    _check_processes(trainer)
    metrics.attach(trainer)
    metrics.data["world_size"] = trainer.world_size
    if trainer.world_size > 1:  # a different global batch: runs compare only with the same world size
        metrics.data["settings"]["world_size"] = trainer.world_size
    if trainer.local_rank == 0:
        # Download or extract now (Lightning would do it inside fit), then check what was extracted: a
        # corrupt archive stops the run here, before anything is written.
        datamodule.prepare_data()
        datamodule.check()
    resumable_train_data(datamodule, cfg.seed, indices=cfg.crs.prob == "sample_cache")
    # One run per run dir, from its first write on: rank 0 holds the lock until it returns (the other ranks
    # write nothing themselves).
    lock = RunDirLock(run_dir) if trainer.global_rank == 0 else None
    if cfg.ckpt_path is None:
        # Every check passed: from here on a crash, or a kill while the model loads, leaves a marked record.
        # (A resumed run keeps its earlier record until the checkpoint's figures are restored at fit start.)
        metrics.write("incomplete")
    else:
        if Path(cfg.ckpt_path).resolve().parent.parent != run_dir.resolve():
            log.warning(
                "resuming from %s in a new run dir %s: checkpoint selection starts afresh. To continue the "
                "run in place, give a checkpoint under <run dir>/checkpoints/ (its run dir is then used) or "
                "add hydra.run.dir=<the run dir of the checkpoint>.",
                cfg.ckpt_path,
                run_dir,
            )
        if trainer.is_global_zero:
            _keep_csv_logs(loggers)
            keep_complete_record(run_dir)  # a complete run trained on: its record is kept beside
        # Resuming in place: the checkpoint dir is expected to hold the earlier checkpoints.
        warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty")
    try:
        model = ViTClassifier(
            model=_container(cfg.model),
            crs=_container(cfg.crs),
            optim=_container(cfg.optim),
            num_labels=datamodule.num_classes,
            class_names=list(datamodule.class_names),
            seed=cfg.seed,
            image_size=cfg.data.image_size,
        )
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        # The checkpoint callback that selects on a metric (step_checkpoint only keeps last.ckpt).
        selectors = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None)]
        selector = selectors[0] if selectors else None
        best = selector.best_model_path if selector is not None else ""
        if not best:
            log.warning("no best checkpoint was saved: testing the final weights")
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        # val_acc is the score of the checkpoint just tested, when checkpoint selection ran.
        score = selector.best_model_score if best else None
        metrics.data["sample_cache"] = model.sample_cache_summary()
        metrics.finish(
            test_acc=float(results[0]["test/acc"]),
            val_acc=float(score) if score is not None else None,
        )
    except BaseException as err:
        metrics.fail(err)
        raise
    finally:
        if lock is not None:
            lock.release()
    if trainer.is_global_zero:
        data = metrics.data
        val = f"{data['val_acc']:.4f}" if data["val_acc"] is not None else "n/a"
        log.info("val_acc %s, test_acc %.4f; metrics in %s", val, data["test_acc"], metrics.path)
        log.info("memory: %s", memory_summary(data))
    return metrics.data["val_acc"]


def memory_summary(data: dict[str, Any]) -> str:
    """One line of the run's memory and speed figures, with the reduction vs the exact baseline."""
    parts = []
    saved, exact = data.get("saved_bytes_per_step"), data.get("saved_bytes_per_step_exact")
    if saved is not None:
        part = f"saved for backward {saved / 2**20:.1f} MiB/step"
        if exact is not None and saved > 0:
            part += f" (exact: {exact / 2**20:.1f} MiB, {exact / saved:.2f}x less)"
        parts.append(part)
    if data.get("peak_mem_allocated_gib") is not None:
        parts.append(f"peak GPU {data['peak_mem_allocated_gib']:.2f} GiB allocated")
        parts.append(f"{data['peak_mem_reserved_gib']:.2f} GiB reserved")
    if data.get("images_per_s") is not None:
        parts.append(f"{data['images_per_s']:.0f} images/s")
    return ", ".join(parts) or "not measured"


def record_config_failure(cfg: DictConfig, err: ConfigError) -> None:
    """A multirun job refused before training: a "failed" metrics.json naming the error, unless one exists."""
    try:
        path = Path(cfg.run_dir) / "metrics.json"
    except Exception:  # no run dir to write to
        return
    if path.exists():
        return  # an earlier run's record in this dir is left as it is
    data: dict[str, Any] = {key: None for key in METRICS_KEYS}

    def select(key: str) -> Any:
        try:
            return _container(OmegaConf.select(cfg, key, throw_on_missing=False))
        except Exception:
            return None

    for field, key in (("dataset", "data.name"), ("ratio", "crs.ratio"), ("method", "crs.method"),
                       ("targets", "crs.targets"), ("seed", "seed")):  # fmt: skip
        data[field] = select(key)
    data.update(status="failed", error=f"ConfigError: {err}", run_dir=str(path.parent.resolve()), epochs=0)
    write_json_atomic(path, data)


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the repository's conf/ (editable install)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except SIGTERMException:  # Lightning's, once the checkpoint is saved and metrics.json marked interrupted
        log.error(
            "stopped by SIGTERM; to go on, run the same command with ckpt_path=%s",
            last_checkpoint(cfg.run_dir),
        )
        raise SystemExit(128 + signal.SIGTERM) from None  # 143, as a process killed by SIGTERM reports
    except RunAlreadyComplete as err:
        if not _multirun():
            log.error("%s", err)
            raise SystemExit(2) from None
        # Resuming a sweep (ckpt_path=last): its finished jobs are left as they are, and not failures.
        log.warning("job %s left as it is: %s", cfg.run_dir, err)
        return err.val_acc
    except (ConfigError, FloatingPointError) as err:
        if _multirun():
            if isinstance(err, ConfigError) and not isinstance(err, RunDirInUse):  # not the other run's dir
                record_config_failure(cfg, err)
            raise  # Hydra reports it and goes on with the other jobs
        # A bad setting, or a diverged run: the message says it all, no traceback.
        log.error("%s", err)
        if isinstance(err, FloatingPointError):
            last = last_checkpoint(cfg.run_dir)
            if last.is_file():
                log.error("the last good checkpoint is %s", last)
        raise SystemExit(2 if isinstance(err, ConfigError) else 1) from None


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's: launchers that pickle the task function
    # (joblib, submitit) then refer to vitcrs.train.main by name instead of pickling this module's globals.
    from vitcrs.train import main as _main

    _main()
