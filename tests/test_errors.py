"""Bad input stops a run before anything is loaded or written, with a message naming the key, the value and
what is allowed; a diverging run stops before its weights go bad; a failing sweep job spoils no other job."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

import vitcrs.train as app
from conftest import CONF_DIR, compose_config, quiet_env
from conftest import QUICK as DEMO_BATCHES
from support.faults import FAULT
from vitcrs.callbacks import describe_run
from vitcrs.conf import check_added_keys, container
from vitcrs.data import cifar
from vitcrs.errors import ConfigError
from vitcrs.models import ViTClassifier
from vitcrs.resume import crs_changes
from vitcrs.run_dir import RunDirLock
from vitcrs.train import train, validate

pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec:FutureWarning")

QUICK = [*DEMO_BATCHES, "callbacks.progress_bar=null"]


def _fake_checkpoint(path: Path, num_labels: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": {"num_labels": num_labels}}, path)
    return path


def _vit_checkpoint(path: Path, config: dict, crs: dict | None = None, epochs: int = 0) -> Path:
    """A checkpoint of a 10-class ViT of `config` (the `net.` weights vitcrs saves), `crs` settings and
    `epochs` trained."""
    from transformers import ViTConfig, ViTForImageClassification

    net = ViTForImageClassification(ViTConfig(**config, num_labels=10))
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    hparams = {"num_labels": 10} if crs is None else {"num_labels": 10, "crs": crs}
    callbacks = {"MetricsFile": {"epochs": epochs}}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "callbacks": callbacks}, path)
    return path


def _vit_micro() -> dict:
    return dict(OmegaConf.load(CONF_DIR / "model" / "vit_micro.yaml").config)


def _one_class_folder(root: Path) -> list[str]:
    (root / "train" / "cat").mkdir(parents=True)
    (root / "test" / "cat").mkdir(parents=True)
    return []


def _corrupt_tarball(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "cifar-10-python.tar.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00 this is not a gzip stream" * 100)
    return path


def _truncated_folder(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, _ in cifar.SPECS["cifar10"].all_files:
        (folder / name).write_bytes(b"\x80\x04\x95truncated")
    return folder


# experiment=demo's crs settings, and the same at ratio 0.5
CRS_OF_DEMO = {
    "ratio": 0.3,
    "method": "wta_crs",
    "targets": ["lean_block"],
    "min_k": 1,
    "prob": "norm",
    "grad_ema": 0.9,
}
CRS_OF_DEMO_AT_HALF = {**CRS_OF_DEMO, "ratio": 0.5}

# (overrides, a setup step (tmp_path -> extra overrides), what the message must say)
BAD_INPUTS = {
    "ratio zero": (["crs.ratio=0"], None, ["crs.ratio=0 is invalid", "(0, 1]"]),
    "ratio above one": (["crs.ratio=1.5"], None, ["crs.ratio=1.5", "(0, 1]"]),
    "ratio not a number": (["crs.ratio=half"], None, ["crs.ratio='half'", "a number in (0, 1]"]),
    "unknown method": (["crs.method=topk"], None, ["crs.method='topk'", "crs, wta_crs"]),
    "unknown kept dtype": (
        ["crs.ratio=0.3", "crs.keep_dtype=float8"],
        None,
        ["crs.keep_dtype='float8'", "bfloat16"],
    ),
    "unknown target": (["crs.targets=[query,keys]"], None, ["crs.targets", "['keys']", "'context'"]),
    "matmuls with sdpa": (
        ["model.attn_implementation=sdpa", "crs.targets=[query,key,value,scores,context]"],
        None,
        ["['scores', 'context']", "model.attn_implementation='sdpa'", "model.attn_implementation=eager"],
    ),
    "batch size zero": (["data.batch_size=0"], None, ["data.batch_size=0", "integer >= 1"]),
    "batch size negative": (["data.batch_size=-8"], None, ["data.batch_size=-8", "integer >= 1"]),
    "no such model": (
        ["model.name_or_path=/no/such/vit"],
        None,
        ["model.name_or_path='/no/such/vit'", "no such checkpoint directory", "Hub id"],
    ),
    "cifar missing offline": (
        ["dataset=cifar10", "data.source.download=false"],
        None,
        ["CIFAR-10 not found", "cifar-10-batches-py", "cifar-10-python.tar.gz", "data.source.download=true"],
    ),
    "imagefolder empty": (["dataset=imagefolder"], None, ["data.root=", "train/"]),
    "corrupt archive": (
        ["dataset=cifar10"],
        lambda tmp: _corrupt_tarball(tmp / "data") and [],
        [
            "data.source.verify_checksum=true",
            "cifar-10-python.tar.gz",
            "md5",
            "data.source.verify_checksum=false",
        ],
    ),
    "truncated archive files": (
        ["dataset=cifar10", "data.source.verify_checksum=false"],
        lambda tmp: _truncated_folder(tmp / "data") and [],
        ["data_batch_1", "corrupt or truncated"],
    ),
    "no such checkpoint": (
        ["ckpt_path=/no/such.ckpt"],
        None,
        ["ckpt_path='/no/such.ckpt'", "no such checkpoint file", "ckpt_path=null"],
    ),
    "checkpoint of another dataset": (
        [],
        lambda tmp: [f"ckpt_path={_fake_checkpoint(tmp / 'old' / 'x.ckpt', 100)}"],
        ["100-class classifier", "dataset 'synthetic' has 10 classes", "ckpt_path=null"],
    ),
    "checkpoint of another architecture": (
        [],
        lambda tmp: [
            f"ckpt_path={_vit_checkpoint(tmp / 'old' / 'x.ckpt', {**_vit_micro(), 'hidden_size': 32})}"
        ],
        [
            "another architecture",
            "classifier.weight has shape (10, 32)",
            "(10, 64) in the model",
            "ckpt_path=null",
        ],
    ),
    "checkpoint with other crs settings": (
        [],
        lambda tmp: [
            f"ckpt_path={_vit_checkpoint(tmp / 'old' / 'x.ckpt', _vit_micro(), CRS_OF_DEMO_AT_HALF)}"
        ],
        ["other crs settings", "'ratio': 0.5", "'ratio': 0.3", "allow_crs_change=true"],
    ),
    "lr infinite": (["optim.lr=inf"], None, ["optim.lr=inf is invalid", "below 1"]),
    "lr absurd": (["optim.lr=10"], None, ["optim.lr=10 is invalid", "below 1"]),
    "nan in data.std": (["data.std=[nan,0.5,0.5]"], None, ["data.std", "nan", "finite"]),
    "nan in data.mean": (["data.mean=[0.5,nan,0.5]"], None, ["data.mean", "nan", "finite"]),
    "max_epochs zero": (["trainer.max_epochs=0"], None, ["trainer.max_epochs=0 is invalid", "integer >= 1"]),
    "max_epochs negative": (["trainer.max_epochs=-1"], None, ["trainer.max_epochs=-1", "integer >= 1"]),
    "max_epochs not an integer": (["trainer.max_epochs=1.5"], None, ["trainer.max_epochs=1.5", "integer"]),
    "no training batches": (
        ["trainer.limit_train_batches=0"],
        None,
        ["trainer.limit_train_batches=0 is invalid", "integer >= 1", "(0, 1]"],
    ),
    "seed beyond Lightning's range": (["seed=4294967296"], None, ["seed=4294967296", "4294967295"]),
    "flash attention not installed": (
        ["model.attn_implementation=flash_attention_2", "crs.targets=[query]"],
        None,
        ["flash_attention_2", "flash-attn", "model.attn_implementation=sdpa"],
    ),
    "imagefolder with one class": (
        ["dataset=imagefolder"],
        lambda tmp: _one_class_folder(tmp / "data"),
        ["single class folder", "'cat'", "at least 2 classes"],
    ),
    "no targets but a ratio": (
        ["crs.targets=[]"],
        None,
        ["crs.targets=[] samples nothing", "crs.ratio=0.3", "crs.ratio=1.0"],
    ),
    "min_k keeps every pair": (
        ["crs.min_k=100000"],
        None,
        ["crs.min_k=100000 keeps every pair", "crs.ratio=0.3", "crs.ratio=1.0"],
    ),
    "checkpoint unreadable": (
        [],
        lambda tmp: [f"ckpt_path={(tmp / 'junk.ckpt').write_bytes(b'junk') and tmp / 'junk.ckpt'}"],
        ["cannot be read as a checkpoint", "ckpt_path=null"],
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_named_before_anything_is_loaded(compose_cfg, tmp_path, name):
    overrides, setup, expected = BAD_INPUTS[name]
    extra = setup(tmp_path) if setup else []
    cfg = compose_cfg("experiment=demo", *overrides, *extra)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    for text in expected:
        assert text in str(err.value), (text, str(err.value))
    assert not (tmp_path / "run").exists(), "nothing may be written before validation passes"


ADDED_KEYS = {
    "+data.foo=1": ("under data", "batch_size"),
    "+foo=1": ("at the top level", "seed"),
    "+optim.momentum=0.9": ("under optim", "weight_decay"),
    "+model.config.hiden_size=8": ("under model.config", "hidden_size"),
    # `++` sets a key where there is one, else adds it: a typo is refused as with `+`
    "++foo=1": ("at the top level", "seed"),
    "++model.config.hidden_dropout=0.1": ("under model.config", "hidden_size"),
    "++optim.momentum=0.9": ("under optim", "weight_decay"),
}


@pytest.mark.parametrize("override", list(ADDED_KEYS))
def test_an_added_key_that_nothing_reads_is_refused_with_the_known_keys(tmp_path, override):
    where, known = ADDED_KEYS[override]
    overrides = [f"hydra.run.dir={tmp_path / 'run'}", f"data.root={tmp_path}", "experiment=demo", override]
    cfg = compose_config("config", *overrides, hydra_node=True)
    HydraConfig.instance().set_config(cfg)  # as `python -m vitcrs.train ...` has it
    try:
        with pytest.raises(ConfigError) as err:
            validate(cfg)
    finally:
        HydraConfig.instance().cfg = None
    message = str(err.value)
    assert message.startswith(f"{override}: vitcrs reads no key") and where in message and known in message
    assert not (tmp_path / "run").exists()


def test_keys_added_where_their_reader_checks_them_are_let_through(compose_cfg):
    added = [
        "+trainer.accumulate_grad_batches=2",
        "+callbacks.fault.kill_at_step=3",
        "+model.config.qkv_bias=false",
        "+data.batch_indices=true",  # a VisionDataModule argument
        # `++` on keys the configuration has (one of them ??? until set), or where `+` may add one
        "++trainer.max_epochs=2",
        "++crs.ratio=0.5",
        "++seed=3",
        "++model.name_or_path=/some/vit",
        "++model.config.qkv_bias=true",
        "++trainer.accumulate_grad_batches=2",
    ]
    cfg = compose_cfg("experiment=study_tiny", *added)
    check_added_keys(cfg, added)
    # ... but one the app sets itself is refused by its owner, rather than silently overridden
    with pytest.raises(ConfigError, match=r"data.batch_indices is set by vitcrs itself.*sample_cache"):
        validate(compose_cfg("experiment=study_tiny", "model=vit_micro", "+data.batch_indices=true"))


def test_offline_download_says_where_to_put_the_files(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "can_reach", lambda url, timeout=5.0: "www.cs.toronto.edu unreachable")
    cfg = compose_cfg("experiment=demo", "dataset=cifar100")
    with pytest.raises(ConfigError, match=r"cannot fetch it: www\.cs\.toronto\.edu unreachable") as err:
        validate(cfg)
    assert "cifar-100-python.tar.gz" in str(err.value) and str(tmp_path / "data") in str(err.value)


def test_corrupt_archive_without_checksum_stops_before_training(compose_cfg, tmp_path):
    """An archive that is only extracted (verify_checksum=false) is checked before anything is written."""
    _corrupt_tarball(tmp_path / "data")
    cfg = compose_cfg(*QUICK, "dataset=cifar10", "data.source.verify_checksum=false")
    with pytest.raises(ConfigError, match=r"cannot be extracted.*Fix: delete it"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_trainer_settings_lightning_refuses_are_config_errors(compose_cfg, tmp_path):
    cfg = compose_cfg(*QUICK, "trainer.accelerator=magic")
    with pytest.raises(ConfigError, match=r"trainer/callbacks/logger settings .*accelerator='magic'"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_data_parallel_in_a_sweep_is_refused(compose_cfg, tmp_path, monkeypatch):
    """Lightning would start rank 1 by re-running the whole `-m` command: refused, before anything runs."""
    monkeypatch.setattr(app, "multirun", lambda: True)  # a job of a -m sweep
    cfg = compose_cfg(*QUICK, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    with pytest.raises(ConfigError, match=r"2 processes in a -m sweep.*hydra/launcher=slurm"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def _snapshot(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["crs.ratio=7"], "crs.ratio=7 is invalid"), ([], "3-class classifier, but dataset 'synthetic'")],
    ids=["bad setting", "checkpoint of another dataset"],
)
def test_bad_resume_leaves_the_existing_run_untouched(run_train, tmp_path, extra, message):
    run_dir = tmp_path / "old"
    ckpt = _fake_checkpoint(run_dir / "checkpoints" / "last.ckpt", 3)
    (run_dir / "metrics.json").write_text(json.dumps({"status": "complete", "test_acc": 0.5}))
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run_dir / "csv").mkdir()
    (run_dir / "csv" / "metrics.csv").write_text("epoch,val/acc\n0,0.5\n")
    before = _snapshot(run_dir)

    proc = run_train("experiment=demo", *extra, f"ckpt_path={ckpt}", cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and message in out and "Traceback" not in out
    after = _snapshot(run_dir)
    assert {k: v for k, v in after.items() if k in before} == before  # every earlier file as it was
    new = set(after) - set(before)  # only the launch's own config (.hydra/<time>/) and its log line
    assert all(k.startswith(".hydra/") or k == "train.log" for k in new), new
    assert not (tmp_path / "outputs").exists()  # the run dir was the checkpoint's, no other was made


def test_resuming_with_other_crs_settings_when_allowed_is_recorded(compose_cfg, tmp_path):
    ckpt = _vit_checkpoint(tmp_path / "old" / "checkpoints" / "last.ckpt", _vit_micro(), CRS_OF_DEMO_AT_HALF)
    cfg = compose_cfg("experiment=demo", f"ckpt_path={ckpt}", "allow_crs_change=true")
    run = validate(cfg)
    changed = crs_changes(torch.load(ckpt, weights_only=False)["hyper_parameters"], container(cfg.crs))
    assert changed == run.crs_before_resume == {"ratio": 0.5}
    record = describe_run(run.settings, changed)
    assert record.ratio == 0.3 and record.settings["crs_before_resume"] == {"ratio": 0.5}


def test_an_image_folder_is_recorded_under_its_own_name_unless_named(compose_cfg, tmp_path):
    root = tmp_path / "flowers"
    for split in ("train", "test"):
        for name in ("daisy", "rose"):
            (root / split / name).mkdir(parents=True)
    sized = ["data.image_size=32", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"]
    cfg = compose_cfg("experiment=demo", "dataset=imagefolder", f"data.root={root}", *sized)
    assert instantiate(cfg.data).name == "flowers"  # the record's dataset (`describe_run`)
    cfg = compose_cfg("experiment=demo", "dataset=imagefolder", f"data.root={root}", *sized, "data.name=mine")
    assert instantiate(cfg.data).name == "mine"


RUN_DIR_CONFLICTS = {
    "checkpoints is a file": (
        lambda run: (run / "checkpoints").write_text("x"),
        "checkpoints exists and is not a",
    ),
    "metrics.json is a folder": (
        lambda run: (run / "metrics.json").mkdir(),
        "metrics.json exists and is not a",
    ),
    "a complete run, nothing left to train": (
        lambda run: (run / "metrics.json").write_text(json.dumps({"status": "complete", "test_acc": 0.5})),
        "records a complete run: this launch would only test again",
    ),
    "a complete run, started afresh": (
        lambda run: (run / "metrics.json").write_text(json.dumps({"status": "complete", "test_acc": 0.5})),
        "records a complete run: this launch would start afresh over it",
    ),
}


@pytest.mark.parametrize("name", list(RUN_DIR_CONFLICTS))
def test_an_existing_run_dir_that_cannot_take_the_run_is_refused(compose_cfg, tmp_path, name):
    make, message = RUN_DIR_CONFLICTS[name]
    run = tmp_path / "run"
    if name not in ("checkpoints is a file", "a complete run, started afresh"):  # a run to resume in place
        _vit_checkpoint(run / "checkpoints" / "last.ckpt", _vit_micro(), CRS_OF_DEMO, epochs=3)  # demo's 3
    run.mkdir(exist_ok=True)
    make(run)
    before = _snapshot(run)
    cfg = compose_cfg("experiment=demo", "ckpt_path=last")  # resume in place (or start, without last.ckpt)
    with pytest.raises(ConfigError, match=message) as err:
        validate(cfg)
    assert "hydra.run.dir=<new dir>" in str(err.value)
    assert _snapshot(run) == before


def test_a_complete_job_of_a_resumed_sweep_is_left_as_it_is(compose_cfg, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _vit_checkpoint(run / "checkpoints" / "last.ckpt", _vit_micro(), CRS_OF_DEMO, epochs=3)
    (run / "metrics.json").write_text(json.dumps({"status": "complete", "val_acc": 0.75}))
    before = _snapshot(run)
    monkeypatch.setattr(app, "multirun", lambda: True)  # `-m ... ckpt_path=last` over a finished sweep
    assert app.main(compose_cfg("experiment=demo", "ckpt_path=last")) == 0.75  # its score, no failure
    monkeypatch.setattr(app, "multirun", lambda: False)  # a single run: refused (exit status 2)
    with pytest.raises(SystemExit) as exited:
        app.main(compose_cfg("experiment=demo", "ckpt_path=last"))
    assert exited.value.code == 2 and _snapshot(run) == before


@pytest.mark.timeout(120)
def test_a_busy_run_dir_is_refused_and_a_killed_run_leaves_it_free(run_train, tmp_path):
    run_dir = tmp_path / "run"
    hold = (
        "import sys, time; from vitcrs.run_dir import RunDirLock; "
        "lock = RunDirLock(sys.argv[1]); print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(run_dir)], env=quiet_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        proc = run_train(*QUICK, f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False)
    finally:
        holder.kill()  # SIGKILL: no cleanup, as a crashed or preempted run
        holder.wait()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert f"is in use by another vitcrs run (pid {holder.pid}" in out and "hydra.run.dir=<new dir>" in out
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "checkpoints").exists()
    assert not (run_dir / "csv").exists()
    RunDirLock(run_dir).release()  # the killed holder left its lock file, but not the lock


def test_a_bad_setting_creates_no_checkpoints(run_train, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train("experiment=demo", "data.batch_size=0", f"hydra.run.dir={run_dir}", cwd=tmp_path,
                     check=False)  # fmt: skip
    assert proc.returncode == 2 and "data.batch_size=0 is invalid" in proc.stdout + proc.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()


# --- divergence ----------------------------------------------------------------------------------------


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(run_train, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        *QUICK,
        "trainer.limit_train_batches=6",
        "callbacks.step_checkpoint.every_n_train_steps=1",
        FAULT,
        "+callbacks.fault.nan_at_step=3",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out
    assert "training loss became nan at epoch 0, step 3" in out
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / 'last.ckpt'}" in out
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3  # saved after step 3; the NaN step was never taken
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "failed" and m["error"].startswith("FloatingPointError: training loss became nan")


class _InfGradient(Callback):
    """Makes one gradient infinite after the backward of step `at` (the loss stays finite)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_after_backward(self, trainer: Trainer, pl_module) -> None:
        if trainer.global_step == self.at:
            next(p for p in pl_module.parameters() if p.grad is not None).grad[0] = math.inf


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_non_finite_gradients_stop_before_the_optimizer_step(tiny_vit_config, tmp_path):
    module = ViTClassifier(
        model={"name_or_path": None, "attn_implementation": "eager", "config": tiny_vit_config},
        crs={"ratio": 0.5, "targets": ["query", "fc1"]},
        optim={"lr": 1e-3, "weight_decay": 0.0, "warmup_fraction": 0.0},
        num_labels=4,
    )
    data = TensorDataset(torch.randn(32, 3, 32, 32), torch.arange(32) % 4)
    trainer = Trainer(
        accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
        callbacks=[_InfGradient(at=2)],
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"gradients became non-finite .* step 2 .*finite loss"):
        trainer.fit(module, DataLoader(data, batch_size=8))
    assert trainer.global_step == 2  # the third step was not taken
    assert all(torch.isfinite(p).all() for p in module.parameters())


class _InfWeight(Callback):
    """Makes one weight infinite just before the optimizer step of step `at` (loss and gradients stay finite),
    as an overflowing update would leave it."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_before_optimizer_step(self, trainer: Trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                next(iter(pl_module.parameters()))[0] = math.inf


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_non_finite_weights_after_a_step_stop_before_any_checkpoint_holds_them(tiny_vit_config, tmp_path):
    module = ViTClassifier(
        model={"name_or_path": None, "attn_implementation": "eager", "config": tiny_vit_config},
        crs={"ratio": 0.5, "targets": ["query", "fc1"]},
        optim={"lr": 1e-3, "weight_decay": 0.0, "warmup_fraction": 0.0},
        num_labels=4,
    )
    data = TensorDataset(torch.randn(32, 3, 32, 32), torch.arange(32) % 4)
    every_step = ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True, every_n_train_steps=1)
    trainer = Trainer(
        accelerator="cpu", max_steps=5, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[_InfWeight(at=2), every_step],
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"weights became non-finite .* step 2 .*finite gradients"):
        trainer.fit(module, DataLoader(data, batch_size=8))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_a_nan_loss_before_any_update_blames_the_input_not_the_learning_rate(tiny_vit_config, tmp_path):
    module = ViTClassifier(
        model={"name_or_path": None, "attn_implementation": "eager", "config": tiny_vit_config},
        crs={"ratio": 1.0, "targets": []},
        optim={"lr": 1e-3, "weight_decay": 0.0, "warmup_fraction": 0.0},
        num_labels=4,
    )
    data = TensorDataset(torch.full((8, 3, 32, 32), math.nan), torch.arange(8) % 4)
    trainer = Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"step 0 .*not the learning rate.*data.mean/data.std"):
        trainer.fit(module, DataLoader(data, batch_size=8))


# --- sweeps --------------------------------------------------------------------------------------------


def _has_joblib_launcher() -> bool:
    try:
        import hydra_plugins.hydra_joblib_launcher  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    "launcher",
    [
        "basic",
        pytest.param(
            "parallel",
            marks=pytest.mark.skipif(not _has_joblib_launcher(), reason="pip install -e '.[joblib]'"),
        ),
    ],
)
def test_a_failing_sweep_job_is_recorded_and_spares_the_others(run_train, tmp_path, launcher):
    sweep = tmp_path / "sweep"
    chosen = [] if launcher == "basic" else [f"hydra/launcher={launcher}"]
    # joblib's workers unpickle the task function in processes of their own: from a process of its own too
    proc = run_train("-m", *chosen, *QUICK, "trainer.limit_train_batches=2", "crs.ratio=7,0.5",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False,
                     process=launcher == "parallel")  # fmt: skip
    assert proc.returncode != 0  # the sweep reports its failed job
    failed = json.loads((sweep / "0" / "metrics.json").read_text())
    assert failed["status"] == "failed" and failed["error"].startswith("ConfigError: crs.ratio=7 is invalid")
    assert failed["ratio"] == 7 and failed["dataset"] == "synthetic" and failed["run_dir"] == str(sweep / "0")
    done = json.loads((sweep / "1" / "metrics.json").read_text())
    assert done["status"] == "complete" and done["ratio"] == 0.5 and done["test_acc"] is not None
    assert not (sweep / "0" / "checkpoints").exists()
