"""The Hydra configuration in the repository's `conf/`: where it is, what composing it needs (`register`), the
Hydra app's runtime (choices, sweeps), and the check that belongs to no config node: `+key` additions that
nothing would read. The mains (`vitcrs.train`, `vitcrs.fidelity`) turn the composed config into checked,
typed settings; nothing below them reads a DictConfig.

vitcrs must be installed editable (`pip install -e .`) or run from a checkout: `conf/` is found relative to
this file.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from vitcrs.crs import CRSConfig, target_set
from vitcrs.errors import ConfigError
from vitcrs.run_dir import checkpoint_run_dir, hydra_output_subdir

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the repository's conf/ (editable install)
# Nodes whose added keys (`+trainer.accumulate_grad_batches=2`, `+callbacks.x._target_=...`) go to
# constructors that refuse unknown arguments themselves; a key added anywhere else would be read by nothing.
ADDABLE_NODES = ("trainer", "callbacks", "logger", "hydra")


def register() -> None:
    """Register what conf/ needs beyond its files, before anything composes it: the resolvers and the node
    crs/crs_config. Called by each main (`vitcrs.train`, `vitcrs.fidelity`) and the tests' compose helper;
    calling it again changes nothing.

    - `${vitcrs.run_dir:...}`, `${vitcrs.hydra_subdir:...}` (conf/config.yaml): hydra.run.dir follows
      ckpt_path into its run dir; a re-used run dir keeps its .hydra/;
    - `${vitcrs.targets:study}`: a named target set of vitcrs.crs.TARGET_SETS (a ListConfig, so that
      OmegaConf.resolve, e.g. `--cfg job --resolve`, can put the list in place);
    - crs/crs_config, which conf/crs/default.yaml extends: CRSConfig's fields are the one home of the crs.*
      defaults. A plain node, not a structured config: bad values reach CRSConfig, whose error names the key.
    """
    OmegaConf.register_new_resolver("vitcrs.run_dir", checkpoint_run_dir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("vitcrs.hydra_subdir", hydra_output_subdir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("vitcrs.targets", lambda name: ListConfig(target_set(name)), replace=True)
    ConfigStore.instance().store(group="crs", name="crs_config", node=CRSConfig().to_dict())


def container(node: Any) -> Any:
    """A config node as plain Python (resolved), anything else as it is."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as plain Python (resolved), without Hydra's own `hydra` node."""
    return container(OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"]))


def choice(group: str) -> str | None:
    """The option chosen for a config group (e.g. "model" -> "vit_micro"), None outside a Hydra app."""
    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def multirun() -> bool:
    """Whether this job is one of a `-m` sweep."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def select(cfg: DictConfig, key: str) -> Any:
    """The plain value of the dotted `key` of `cfg`; None when it is missing or does not resolve."""
    try:
        return container(OmegaConf.select(cfg, key, throw_on_missing=False))
    except Exception:  # an interpolation that does not resolve
        return None


def _has_key(cfg: DictConfig, key: str) -> bool:
    """Whether `cfg` has the dotted `key` (also when its value is ??? or null)."""
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and name in list(node.keys())  # `in node` is False for ??? values


def compose_base(config_name: str, overrides: list[str]) -> DictConfig:
    """`config_name` of conf/ composed with `overrides` (no Hydra node): in the running app's Hydra, else in
    one initialised for this call."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name, overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def check_added_keys(cfg: DictConfig, overrides: list[str], config_name: str = "config") -> None:
    """ConfigError for a `+key=value` or `++key=value` override adding a key that nothing reads (it would be
    silently ignored).

    Allowed: config groups (`+experiment=...`), keys under ADDABLE_NODES, arguments of a node's `_target_`
    (e.g. `+data.source.<argument>=...`), the model family's keys under model (`ModelFamily.keys`) and its
    architecture settings under model.config (`ModelFamily.accepts_config_key`: ViTConfig fields,
    timm.create_model arguments), and a `++key` that sets a key the configuration has without it
    (`config_name` composed with the other overrides). The message lists the keys known where the new one was
    added.
    """
    groups = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    parsed = OverridesParser.create().parse_overrides(overrides)
    base: DictConfig | None = None  # the configuration without the `++key` overrides, composed when needed
    for override in parsed:
        if not (override.is_add() or override.is_force_add()):
            continue
        key = override.key_or_group
        if "/" in key or key in groups or key.split(".")[0] in ADDABLE_NODES:
            continue
        parent, _, name = key.rpartition(".")
        if parent in ("model", "model.config") and _read_by_model_family(cfg, parent, name):
            continue
        if override.is_force_add():  # `++key` sets a key where there is one, else adds it as `+key` does
            if base is None:
                keys = [o for o in parsed if o.is_force_add() and o.key_or_group not in groups]
                base = compose_base(config_name, [o.input_line for o in parsed if o not in keys])
            if _has_key(base, key):
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
        plus = "++" if override.is_force_add() else "+"
        vit = " or use an architecture setting of model.family" if parent == "model.config" else ""
        raise ConfigError(
            f"{override.input_line}: vitcrs reads no key {key!r}, so it would be silently ignored. Known "
            f"keys {where}: {', '.join(sorted(known))}. Fix the name (without the {plus}, to change a known "
            f"key){vit}, or drop it."
        )


def _read_by_model_family(cfg: DictConfig, parent: str, name: str) -> bool:
    """Whether cfg.model's family reads `<parent>.<name>`: a key of its model node (parent "model", e.g.
    model.with_teacher, model.weights), or an architecture setting (parent "model.config"). False for an
    unknown model.family (refused with the choices when the model node is checked)."""
    from vitcrs.models import named_family  # here: composing configs (vitcrs.conf) needs no network code

    family = named_family(container(cfg.model))
    if family is None:
        return False
    return name in family.keys if parent == "model" else family.accepts_config_key(name)


def check_overrides(cfg: DictConfig) -> None:
    """In a Hydra app, `check_added_keys` on the command line's overrides of `cfg`; outside one, nothing."""
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        check_added_keys(cfg, list(hydra.overrides.task), hydra.job.config_name or "config")
