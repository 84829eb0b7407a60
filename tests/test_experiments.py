"""The study's named experiments (conf/experiment/study, study_tiny, targets_ablation): their sweep grids as
Hydra's basic sweeper expands them, every job valid; and real CPU multiruns through `vitcrs.report`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from cifar_archives import write_cifar10, write_cifar100
from conftest import CONF_DIR, compose_config
from vitcrs.crs import TARGET_SETS, validate_targets
from vitcrs.errors import ConfigError
from vitcrs.train import validate

pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec:FutureWarning")

STUDY_TARGETS = ["query", "key", "value", "scores", "context"]
LINEARS = ["query", "key", "value", "attn_output", "fc1", "fc2"]
# One short epoch on CPU, no progress bar: a job takes about a second.
FEW_BATCHES = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "callbacks.progress_bar=null",
]


def sweep_jobs(experiment: str, *cli: str) -> list[list[str]]:
    """The jobs of `python -m vitcrs.train -m experiment=<experiment> *cli`: the experiment's
    hydra.sweeper.params followed by the command line, expanded as Hydra's BasicSweeper does."""
    cfg = compose_config("config", f"experiment={experiment}", hydra_node=True)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
    overrides = OverridesParser.create().parse_overrides([*params, f"experiment={experiment}", *cli])
    (jobs,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return jobs


def job_value(job: list[str], key: str) -> str:
    """The value `key` gets in one job's override list."""
    return next(o.split("=", 1)[1] for o in job if o.split("=", 1)[0].lstrip("+") == key)


# --- composition: the grids -----------------------------------------------------------------------------


@pytest.mark.slow
def test_study_is_three_datasets_by_three_ratios(compose_cfg):
    jobs = sweep_jobs("study")
    grid = {(job_value(j, "dataset"), job_value(j, "crs.ratio")) for j in jobs}
    assert len(jobs) == 9 and grid == {
        (d, r) for d in ("cifar10", "cifar100", "cifar100_coarse") for r in ("1.0", "0.5", "0.3")
    }
    labels = {}
    for job in jobs:
        cfg = compose_cfg(*job)
        assert cfg.model.name_or_path == "google/vit-base-patch16-224-in21k"
        assert cfg.model.attn_implementation == "eager" and cfg.data.image_size is None  # the model's: 224
        assert cfg.data.batch_size == 64 and cfg.trainer.max_epochs == 8 and cfg.optim.lr == 5e-5
        assert cfg.crs.method == "wta_crs" and list(cfg.crs.targets) == STUDY_TARGETS
        assert cfg.trainer.precision == "32-true" and cfg.seed == 0
        assert cfg.crs.ratio == float(job_value(job, "crs.ratio"))
        labels[cfg.data.name] = (cfg.data.source.variant, cfg.data.source.label_type)
    assert labels == {
        "cifar10": ("cifar10", "fine"),
        "cifar100": ("cifar100", "fine"),
        "cifar100_coarse": ("cifar100", "coarse"),
    }


def test_study_takes_seeds_and_command_line_lists(compose_cfg):
    jobs = sweep_jobs("study", "seed=0,1,2")
    assert len(jobs) == 27 and {job_value(j, "seed") for j in jobs} == {"0", "1", "2"}
    # a key given on the command line replaces the experiment's list
    jobs = sweep_jobs("study", "crs.ratio=0.5", "crs.method=crs")
    assert [job_value(j, "dataset") for j in jobs] == ["cifar10", "cifar100", "cifar100_coarse"]
    cfg = compose_cfg(*jobs[0])
    assert cfg.crs.method == "crs" and cfg.crs.ratio == 0.5


@pytest.mark.slow
def test_study_tiny_on_the_cifar10_jpeg_folder(compose_cfg, tmp_path):
    assert len(sweep_jobs("study_tiny")) == 9
    cli = [
        "model.name_or_path=/models/vit-tiny-patch16-224",
        "dataset=imagefolder",
        "data.root=/d/cifar10-jpeg",
        "data.name=cifar10",  # a folder tree is recorded under its folder's name unless named
    ]
    jobs = sweep_jobs("study_tiny", *cli)
    assert [job_value(j, "crs.ratio") for j in jobs] == ["1.0", "0.5", "0.3"]
    for job in jobs:
        cfg = compose_cfg(*job)
        assert cfg.model.name_or_path == "/models/vit-tiny-patch16-224" and cfg.data.root == "/d/cifar10-jpeg"
        assert cfg.data.source._target_ == "vitcrs.data.ImageFolderSource" and cfg.data.name == "cifar10"
        assert cfg.model.attn_implementation == "eager" and list(cfg.crs.targets) == STUDY_TARGETS
        assert cfg.crs.method == "wta_crs" and cfg.data.batch_size == 64 and cfg.trainer.max_epochs == 3
        validate_targets(cfg.crs.targets, cfg.model.attn_implementation)
    # everything else is the study's (study_tiny inherits it): the same config but for the model and length
    tiny, study = (OmegaConf.to_container(compose_cfg(f"experiment={e}")) for e in ("study_tiny", "study"))
    assert tiny.pop("model") != study.pop("model") and tiny["trainer"].pop("max_epochs") == 3
    assert study["trainer"].pop("max_epochs") == 8 and tiny == study
    # the checkpoint is mandatory: a clean error naming the key, before anything is loaded
    cfg = compose_cfg("experiment=study_tiny")
    assert OmegaConf.is_missing(cfg.model, "name_or_path")
    with pytest.raises(ConfigError, match=r"model\.name_or_path is missing"):
        validate(cfg)


@pytest.mark.slow
def test_targets_ablation_grid_has_only_valid_jobs(compose_cfg):
    jobs = sweep_jobs("targets_ablation")
    assert len(jobs) == 24
    seen = set()
    for job in jobs:
        cfg = compose_cfg(*job)
        targets, attn = tuple(cfg.crs.targets), cfg.model.attn_implementation
        validate_targets(targets, attn)  # raises for matmul targets without eager attention
        assert cfg.data.name == "cifar10" and cfg.model.name_or_path == "google/vit-base-patch16-224-in21k"
        assert cfg.data.batch_size == 64 and cfg.trainer.max_epochs == 8 and cfg.optim.lr == 5e-5
        assert cfg.crs.method == job_value(job, "crs.method")
        seen.add((job_value(job, "ablation"), targets, attn, cfg.crs.method, cfg.crs.ratio))
    assert len(seen) == 24
    options = {path.stem for path in (CONF_DIR / "ablation").glob("*.yaml")}
    names = {"qkv", "study", "linears", "linears_sdpa", "lean_all", "lean_block"}
    assert {s[0] for s in seen} == options == names
    assert {s[1:3] for s in seen} == {
        (("query", "key", "value"), "eager"),
        (tuple(STUDY_TARGETS), "eager"),
        (tuple(LINEARS), "eager"),
        (tuple(LINEARS), "sdpa"),
        (("query", "key", "value", "attn_output", "mlp", "scores", "context"), "eager"),
        (("lean_block",), "sdpa"),
    }
    assert {(s[3], s[4]) for s in seen} == {(m, r) for m in ("crs", "wta_crs") for r in (0.5, 0.3)}
    # narrowed on the command line, and with an exact row per section
    assert len(sweep_jobs("targets_ablation", "ablation=lean_all,study", "crs.method=crs")) == 4
    assert len(sweep_jobs("targets_ablation", "crs.ratio=1.0,0.5,0.3")) == 36


@pytest.mark.slow
def test_conf_names_target_sets_from_the_catalogue(compose_cfg):
    """conf names sets of vitcrs.crs.TARGET_SETS (`${vitcrs.targets:NAME}`): a list on the command line still
    replaces one, a set can be named there too, and OmegaConf.resolve (`--cfg job --resolve`) works."""
    for path in [*(CONF_DIR / "ablation").glob("*.yaml"), *(CONF_DIR / "experiment").glob("*.yaml")]:
        spelled = re.findall(r"^\s*targets:\s*\[", path.read_text(), flags=re.MULTILINE)
        assert not spelled, f"{path.name} spells out a target set: name one of {list(TARGET_SETS)}"
    study = compose_cfg("experiment=study")
    assert list(study.crs.targets) == STUDY_TARGETS == list(TARGET_SETS["study"])
    OmegaConf.resolve(study)  # the list takes the interpolation's place
    assert OmegaConf.to_container(study.crs)["targets"] == STUDY_TARGETS
    assert list(compose_cfg("experiment=study", "crs.targets=[query,key]").crs.targets) == ["query", "key"]
    lean = compose_cfg("experiment=study", "crs.targets=${vitcrs.targets:lean}")
    assert list(lean.crs.targets) == ["query", "key", "value", "attn_output", "mlp"]
    validate(compose_cfg("experiment=demo", "crs.targets=${vitcrs.targets:lean}"))
    bad = compose_cfg("crs.targets=${vitcrs.targets:lean_mlp}")
    with pytest.raises(InterpolationResolutionError, match=r"no target set named 'lean_mlp'.*study, qkv"):
        list(bad.crs.targets)


# --- real CPU multiruns and their report ------------------------------------------------------------------


def report(sweep: Path, out: Path) -> tuple[str, str]:
    """accuracy.md and memory.md of `python -m vitcrs.report <sweep> --out <out>` (its main, in process)."""
    from vitcrs.report import main

    assert main([str(sweep), "--out", str(out)]) == 0
    return (out / "accuracy.md").read_text(), (out / "memory.md").read_text()


def md_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in `text`, header rows included."""
    return [
        [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")
    ]


def test_two_ratio_multirun_report_shows_drop_and_memory_reduction(ratio_sweep, tmp_path):
    """The report of a `-m ... crs.ratio=1.0,0.3` sweep (conftest.ratio_sweep)."""
    accuracy, memory = report(ratio_sweep, tmp_path / "report")
    assert accuracy.count("## Group") == 1  # both runs in one section, so in one table
    rows = md_rows(accuracy)
    assert rows[0] == ["Ratio", "synthetic"]
    assert rows[2][0] == "1 (exact)" and re.fullmatch(r"\d+\.\d\d", rows[2][1])
    assert rows[3][0] == "0.3" and re.fullmatch(r"\d+\.\d\d \(([+−]|±)\d+\.\d\d\)", rows[3][1])
    rows = md_rows(memory)
    assert rows[0] == ["Dataset", "Ratio", "Saved for backward / step", "Images/s"]  # CPU: no GPU peaks
    assert rows[2][:2] == ["synthetic", "1 (exact)"] and re.fullmatch(r"\d+\.\d\d MiB", rows[2][2])
    factor = re.fullmatch(r"\d+\.\d\d MiB \((\d+\.\d\d)x\)", rows[3][2])
    assert rows[3][:2] == ["synthetic", "0.3"] and factor and float(factor.group(1)) > 1.0


def test_study_sweep_runs_cifar10_and_cifar100_fine_and_coarse(run_train, tmp_path):
    """The study's own sweep params (no dataset on the command line) on generated official-format archives."""
    data = tmp_path / "data"
    write_cifar10(data)
    write_cifar100(data)
    sweep = tmp_path / "sweep"
    local = [f"data.root={data}", "data.source.download=false", "data.source.verify_checksum=false",
             "data.num_workers=0"]  # fmt: skip
    tiny = ["model=vit_micro", "trainer=cpu", "crs.ratio=0.3", *local, *FEW_BATCHES]
    run_train("-m", "experiment=study", *tiny, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    records = [json.loads((sweep / str(n) / "metrics.json").read_text()) for n in range(3)]
    assert [(m["status"], m["dataset"], m["label_type"], m["num_classes"]) for m in records] == [
        ("complete", "cifar10", "fine", 10),
        ("complete", "cifar100", "fine", 100),
        ("complete", "cifar100_coarse", "coarse", 20),
    ]
    assert all(m["ratio"] == 0.3 and m["targets"] == STUDY_TARGETS for m in records)
    accuracy, _ = report(sweep, tmp_path / "report")
    assert md_rows(accuracy)[0] == ["Ratio", "CIFAR-10", "CIFAR-100 fine", "CIFAR-100 coarse"]
