"""conf/: every group option composes, every key is documented, validation names the bad key (no training)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import compose_config
from vitcrs.callbacks import describe_run
from vitcrs.errors import ConfigError
from vitcrs.train import validate

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

GROUPS = ("data", "optim", "dataset", "model", "crs", "trainer", "logger", "callbacks", "experiment")
# Files owned by this part of the project, held to "one comment per key".
COMMENTED = (
    [CONF_DIR / "config.yaml", CONF_DIR / "fidelity.yaml"]
    + [
        p
        for g in ("data", "optim", "model", "crs", "trainer", "logger", "callbacks")
        for p in sorted((CONF_DIR / g).glob("*.yaml"))
    ]
    + [CONF_DIR / "experiment" / "demo.yaml"]
    + sorted((CONF_DIR / "hydra" / "launcher").glob("*.yaml"))
)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in GROUPS for o in _options(g)], ids=lambda v: str(v)
)
@pytest.mark.slow
def test_every_group_option_composes(compose_cfg, group, option):
    cfg = compose_cfg(f"{group}={option}")
    # Resolve everything except values that must be given on the command line (???).
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert cfg.data._target_ == "vitcrs.data.VisionDataModule"
    assert {"trainer", "logger", "callbacks", "crs", "optim", "model", "seed", "ckpt_path"} <= set(cfg)


def test_defaults_are_the_study_setup_with_the_sound_targets(compose_cfg):
    """The study's model, data and schedule; the sampled ops are the lean block (activation gradients exact,
    docs/fidelity.md), while experiment=study keeps the study's own targets and probabilities."""
    cfg = compose_cfg()
    assert cfg.model.name_or_path == "google/vit-base-patch16-224-in21k"
    assert cfg.model.attn_implementation == "eager"
    assert cfg.data.batch_size == 64 and cfg.data.name == "cifar10"
    assert cfg.trainer.max_epochs == 8 and cfg.optim.lr == pytest.approx(5e-5)
    assert cfg.crs.ratio == 1.0 and cfg.crs.method == "wta_crs"
    assert list(cfg.crs.targets) == ["lean_block"]
    study = compose_cfg("experiment=study")
    assert list(study.crs.targets) == ["query", "key", "value", "scores", "context"]
    assert study.crs.prob == "sample_cache"


@pytest.mark.parametrize("path", COMMENTED, ids=lambda p: str(p.relative_to(CONF_DIR)))
def test_every_key_has_a_comment(path: Path):
    """Each `key:` line has a # comment on it or just above (not in the defaults list, not _target_)."""
    lines = path.read_text().splitlines()
    bare = []
    in_defaults = False
    for i, line in enumerate(lines):
        if re.match(r"^defaults:", line):
            in_defaults = True
            continue
        if in_defaults and (line.startswith(" ") or not line.strip()):
            continue
        in_defaults = False
        if (
            re.match(r"^\s*(?!_target_)[\w.]+:", line)
            and "#" not in line
            and not lines[i - 1].strip().startswith("#")
        ):
            bare.append(line)
    assert not bare, f"{path.name}: keys without a comment: {bare}"


def test_synthetic_datamodule_from_config(compose_cfg):
    cfg = compose_cfg("experiment=demo")
    settings = validate(cfg).settings
    dm = settings.datamodule
    assert dm.num_classes == 10 and len(dm.class_names) == 10 and dm.name == "synthetic"
    # image size and normalisation come from the model: vit_micro is 32 px, random init -> 0.5
    assert dm.image_size == 32 and list(dm.mean) == [0.5, 0.5, 0.5]
    record = describe_run(settings)
    assert record.settings["model"] == "random-init" and record.ratio == 0.3


def test_checkpoint_normalisation_reaches_the_data(compose_cfg, vit_checkpoint):
    cfg = compose_cfg("dataset=synthetic", f"model.name_or_path={vit_checkpoint}")
    dm = validate(cfg).settings.datamodule
    assert dm.image_size == 32
    assert list(dm.mean) == pytest.approx([0.4] * 3) and list(dm.std) == pytest.approx([0.3] * 3)


def test_multirun_overrides_expand_to_composable_jobs(compose_cfg):
    """`-m dataset=a,b crs.ratio=x,y` is a cartesian sweep; every job composes to what it names."""
    sweep = ["dataset=synthetic,cifar10", "crs.ratio=1.0,0.5,0.3", "model=vit_micro"]
    parsed = OverridesParser.create().parse_overrides(sweep)
    axes = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [o.input_line]
        for o in parsed
    ]
    jobs = list(itertools.product(*axes))
    assert len(jobs) == 6
    for job in jobs:
        cfg = compose_cfg(*job)
        assert f"dataset={cfg.data.name}" in job and f"crs.ratio={cfg.crs.ratio}" in job


BAD = [
    (["crs.ratio=0"], "crs.ratio"),
    (["crs.ratio=1.5"], "crs.ratio"),
    (["crs.method=random"], "crs.method"),
    (["+crs.typo=1"], "crs"),
    (["crs.targets=[query,nope]"], "crs.targets"),
    (["model.attn_implementation=sdpa", "crs.targets=[query,key,value,scores,context]"], "eager"),  # matmuls
    (["model.attn_implementation=magic"], "model.attn_implementation"),
    (["model=vit_tiny"], "model.name_or_path"),
    (["model.name_or_path=/no/such/checkpoint"], "model.name_or_path"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.warmup_fraction=1.0"], "optim.warmup_fraction"),
    (["data.batch_size=0"], "data.batch_size"),
    (["seed=-1"], "seed"),
    (["ckpt_path=/no/such.ckpt"], "ckpt_path"),
    (["data.val_fraction=1.5"], "val_fraction"),  # the datamodule's own check
]


@pytest.mark.parametrize(("overrides", "key"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_settings_raise_config_error_naming_the_key(compose_cfg, tmp_path, overrides, key):
    cfg = compose_cfg("experiment=demo", *overrides)
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(cfg)
    assert not (tmp_path / "run").exists(), "nothing may be written before validation passes"


def test_random_init_needs_an_architecture(compose_cfg):
    cfg = compose_cfg("experiment=demo", "model.config=null")
    with pytest.raises(ConfigError, match=r"model\.config"):
        validate(cfg)


def test_tiny_vit_fixture_matches_micro_shape(tiny_vit_config):
    # The fixtures' tiny ViT keeps the demo's 32 px input, so both run on the same data.
    micro = OmegaConf.load(CONF_DIR / "model" / "vit_micro.yaml")
    assert tiny_vit_config["image_size"] == micro.config.image_size


def _plugin(name: str) -> bool:
    try:
        __import__(f"hydra_plugins.{name}")
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _plugin("hydra_submitit_launcher"), reason="pip install -e '.[slurm]'")
def test_slurm_launcher_asks_for_one_task_per_device():
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    cfg = compose_config("config", *overrides, hydra_node=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.timeout_min > 0 and launcher.max_num_timeout == 0


@pytest.mark.skipif(not _plugin("hydra_joblib_launcher"), reason="pip install -e '.[joblib]'")
def test_parallel_launcher_composes():
    cfg = compose_config("config", "hydra/launcher=parallel", hydra_node=True)
    assert cfg.hydra.launcher._target_.endswith("joblib_launcher.JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 2


def test_data_parallel_trainers_compose(compose_cfg):
    for option, strategy in (("ddp", "DDPStrategy"), ("fsdp", "FSDPStrategy")):
        cfg = compose_cfg("experiment=demo", f"trainer={option}")
        assert cfg.trainer.strategy._target_.endswith(strategy)
        assert cfg.trainer.devices == 2 and cfg.trainer.num_nodes == 1
    policy = OmegaConf.to_container(compose_cfg("trainer=fsdp").trainer.strategy.auto_wrap_policy)
    from hydra.utils import instantiate

    from vitcrs.crs import CRSBlock

    assert instantiate(policy) == {CRSBlock}
