"""Bad input stops a run before anything is loaded or written, with a message naming the key, the value and
what is allowed; a diverging run stops before its weights go bad; a failing sweep job spoils no other job."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

import vitcrs.train as app
from conftest import QUICK as DEMO_BATCHES
from vitcrs.data import cifar
from vitcrs.errors import ConfigError
from vitcrs.models import ViTClassifier
from vitcrs.train import train, validate

pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec:FutureWarning")

QUICK = [*DEMO_BATCHES, "callbacks.progress_bar=null"]


def _fake_checkpoint(path: Path, num_labels: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": {"num_labels": num_labels}}, path)
    return path


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


# (overrides, a setup step (tmp_path -> extra overrides), what the message must say)
BAD_INPUTS = {
    "ratio zero": (["crs.ratio=0"], None, ["crs.ratio=0 is invalid", "(0, 1]"]),
    "ratio above one": (["crs.ratio=1.5"], None, ["crs.ratio=1.5", "(0, 1]"]),
    "ratio not a number": (["crs.ratio=half"], None, ["crs.ratio='half'", "a number in (0, 1]"]),
    "unknown method": (["crs.method=topk"], None, ["crs.method='topk'", "crs, wta_crs"]),
    "unknown target": (["crs.targets=[query,keys]"], None, ["crs.targets", "['keys']", "'context'"]),
    "matmuls with sdpa": (
        ["model.attn_implementation=sdpa"],
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
        ["dataset=cifar10", "data.download=false"],
        None,
        ["CIFAR-10 not found", "cifar-10-batches-py", "cifar-10-python.tar.gz", "data.download=true"],
    ),
    "imagefolder empty": (["dataset=imagefolder"], None, ["data.root=", "train/"]),
    "corrupt archive": (
        ["dataset=cifar10"],
        lambda tmp: _corrupt_tarball(tmp / "data") and [],
        ["data.verify_checksum=true", "cifar-10-python.tar.gz", "md5", "data.verify_checksum=false"],
    ),
    "truncated archive files": (
        ["dataset=cifar10", "data.verify_checksum=false"],
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


def test_offline_download_says_where_to_put_the_files(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "can_reach", lambda url, timeout=5.0: "www.cs.toronto.edu unreachable")
    cfg = compose_cfg("experiment=demo", "dataset=cifar100")
    with pytest.raises(ConfigError, match=r"cannot fetch it: www\.cs\.toronto\.edu unreachable") as err:
        validate(cfg)
    assert "cifar-100-python.tar.gz" in str(err.value) and str(tmp_path / "data") in str(err.value)


def test_corrupt_archive_without_checksum_stops_before_training(compose_cfg, tmp_path, one_thread):
    """An archive that is only extracted (verify_checksum=false) is checked before anything is written."""
    _corrupt_tarball(tmp_path / "data")
    cfg = compose_cfg(*QUICK, "dataset=cifar10", "data.verify_checksum=false")
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
    monkeypatch.setattr(app, "_multirun", lambda: True)
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
        "+callbacks.fault._target_=vitcrs.callbacks.FaultInjector",
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
def test_non_finite_gradients_stop_before_the_optimizer_step(tiny_vit_config, tmp_path, one_thread):
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
    proc = run_train("-m", *chosen, *QUICK, "trainer.limit_train_batches=2", "crs.ratio=7,0.5",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode != 0  # the sweep reports its failed job
    failed = json.loads((sweep / "0" / "metrics.json").read_text())
    assert failed["status"] == "failed" and failed["error"].startswith("ConfigError: crs.ratio=7 is invalid")
    assert failed["ratio"] == 7 and failed["dataset"] == "synthetic" and failed["run_dir"] == str(sweep / "0")
    done = json.loads((sweep / "1" / "metrics.json").read_text())
    assert done["status"] == "complete" and done["ratio"] == 0.5 and done["test_acc"] is not None
    assert not (sweep / "0" / "checkpoints").exists()
