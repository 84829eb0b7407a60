"""Trust: no code runs from a file someone else wrote (checkpoints, CIFAR archives), and every record says
what actually ran (or the setting is refused, naming its key, before training)."""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from cifar_archives import tar_archive, write_cifar10
from conftest import CONF_DIR, QUICK, compose_config
from vitcrs.errors import ConfigError
from vitcrs.resume import crs_changes
from vitcrs.train import train, validate

pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec:FutureWarning")


class WritesMarker:
    """Unpickling this calls `builtins.exec`, which writes `marker`: the payload of a file that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


# A short run keeping every kind of CRS state in its checkpoints (running estimates, the per-image cache
# in uint8, the sampling streams): trained once, copied by the tests that resume it.
RUN = [*QUICK, "callbacks.progress_bar=null", "crs.prob=sample_cache", "crs.cache_format=uint8",
       "crs.cache_in_checkpoint=true"]  # fmt: skip


def _compose(run_dir: Path, *overrides: str) -> DictConfig:
    return compose_config("config", f"run_dir={run_dir}", *overrides)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run dir of a complete RUN."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(_compose(run_dir, *RUN))
    return run_dir


def _copy(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


# --- checkpoints ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_vitcrs_checkpoint_holds_only_what_the_weights_only_unpickler_admits(finished_run):
    """So no type needs allow-listing (add_safe_globals), and anything else in a checkpoint is refused. A new
    kind of state holding another type fails here: allow-list it in vitcrs.resume, or store plain data."""
    for path in sorted((finished_run / "checkpoints").glob("*.ckpt")):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == [], path
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["crs"][0]["grad_norm"] and ckpt["crs"][0]["sample_cache"]  # every kind of state is there


def _payload_checkpoint(path: Path, marker: Path) -> Path:
    """A file that looks like a vitcrs checkpoint (state_dict, num_labels) and runs code when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": {"num_labels": 10}, "x": WritesMarker(marker)}, path)
    return path


@pytest.mark.parametrize("how", ["a path", "last in its run dir"])
def test_a_checkpoint_that_would_run_code_is_refused_unrun(compose_cfg, tmp_path, how):
    marker = tmp_path / "marker"
    if how == "a path":
        ckpt = _payload_checkpoint(tmp_path / "shared" / "model.ckpt", marker)
        cfg = compose_cfg("experiment=demo", f"ckpt_path={ckpt}")
    else:  # a run dir someone else wrote, resumed in place
        ckpt = _payload_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", marker)
        cfg = compose_cfg("experiment=demo", "ckpt_path=last")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert not marker.exists(), "unpickling the checkpoint ran its code"
    message = str(err.value)
    assert f"ckpt_path={str(ckpt)!r} was not loaded" in message and "builtins.exec" in message, message


# --- CIFAR archives --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["folder", "tarball"])
def test_a_cifar_archive_that_would_run_code_is_refused_unrun(compose_cfg, tmp_path, layout):
    """README recommends data.source.verify_checksum=false for archives built by other tools: safe to do."""
    marker, root = tmp_path / "marker", tmp_path / "data"
    folder = write_cifar10(root, n_train_per_batch=4, n_test=4)
    batch = folder / "data_batch_2"
    entry = pickle.loads(batch.read_bytes())
    with open(batch, "wb") as f:  # the data batch, plus one entry whose unpickling runs code
        pickle.dump({**entry, "filenames": WritesMarker(marker)}, f, protocol=2)
    if layout == "tarball":
        tar_archive(folder, root / "cifar-10-python.tar.gz")
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    cfg = compose_cfg("experiment=demo", "dataset=cifar10", "data.source.verify_checksum=false")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert not marker.exists(), "unpickling the archive ran its code"
    message = str(err.value)
    assert "data_batch_2 was not loaded: its pickle holds __builtin__.exec" in message, message  # (py2 name)
    assert not (tmp_path / "run").exists()


def test_the_restricted_unpickler_reads_numpy_1_and_2_batches():
    """The official archives were written by numpy 1 (numpy.core.multiarray), new ones by numpy 2
    (numpy._core): both load, with their arrays, numpy scalars and protocol-2 bytes."""
    import numpy as np

    from vitcrs.data.cifar import CifarUnpickler

    entry = {"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "labels": [1, np.int64(2)], "b": b"\xff"}
    blob = pickle.dumps(entry, protocol=2)
    for data in (blob, blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")):
        loaded = CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
        assert np.array_equal(loaded["data"], entry["data"]) and loaded["labels"] == [1, 2]
        assert loaded["b"] == b"\xff"


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_lightning_loads_checkpoints_weights_only_too(finished_run, tmp_path, monkeypatch):
    """The checkpoint tested after fitting (best_model_path, from the resumed checkpoint's state) is loaded by
    Lightning: weights-only as well, even where the environment asks torch for unsafe loads by default."""
    run_dir = _copy(finished_run, tmp_path / "run")
    record = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**record, "status": "incomplete"}))  # killed at test
    best = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    marker = tmp_path / "marker"
    _payload_checkpoint(best, marker)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError, match=r"exec"):
        train(_compose(run_dir, *RUN, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"))
    assert not marker.exists(), "Lightning's load ran the checkpoint's code"


# --- records say what ran ---------------------------------------------------------------------------------


def _record_of(cfg: DictConfig):
    """The record the run of `cfg` starts with, and its pre-flight."""
    from vitcrs.callbacks import describe_run

    run = validate(cfg).settings
    return describe_run(run), run


def test_settings_the_lean_block_ignores_are_recorded_at_their_defaults(compose_cfg, tiny_vit_config):
    """The lean block draws with p ∝ ‖g‖·‖x‖ whatever crs.prob says, and keeps no per-image cache: a run with
    crs.prob=sample_cache is the default run, and is recorded (and grouped in the report) as it."""
    from vitcrs.models import ViTClassifier

    plain, _ = _record_of(compose_cfg("experiment=demo"))
    cached, run = _record_of(compose_cfg("experiment=demo", "crs.prob=sample_cache", "crs.cache_format=uint8",
                                         "crs.cache_in_checkpoint=true", "crs.grad_ema=0.5"))  # fmt: skip
    assert cached.settings == plain.settings and cached.settings["prob"] == "norm"
    assert run.crs.prob == "norm" and run.crs.cache_format == "bfloat16" and run.crs.grad_ema == 0.9
    assert not run.datamodule.batch_indices  # no image indices for a cache that is not there
    module = ViTClassifier({"name_or_path": None, "config": tiny_vit_config}, run.crs, run.optim, 10)
    assert module.sample_cache_summary() is None  # the record's sample_cache stays null
    # resuming such a checkpoint with crs.prob=norm is no crs change
    saved = {"crs": {**run.crs.to_dict(), "prob": "sample_cache", "cache_in_checkpoint": True}}
    assert crs_changes(saved, run.crs.to_dict()) == {}
    # ... while the ops that draw by crs.prob keep it, and its cache settings
    cfg = compose_cfg("experiment=demo", "crs.targets=[query,fc1]", "crs.prob=sample_cache")
    sampled, run = _record_of(cfg)
    assert sampled.settings["prob"] == "sample_cache" and run.datamodule.batch_indices
    # the lean ops' own settings: kept where a lean op reads them, at their defaults elsewhere
    for targets, kept in (("[lean_block]", "bfloat16"), ("[query,fc1]", None)):
        cfg = compose_cfg("experiment=demo", f"crs.targets={targets}", "crs.keep_dtype=bfloat16")
        record, _ = _record_of(cfg)
        assert record.settings["keep_dtype"] == kept


def test_targets_are_recorded_in_canonical_order_without_repeats(compose_cfg):
    one, _ = _record_of(compose_cfg("experiment=demo", "crs.targets=[query]"))
    twice, _ = _record_of(compose_cfg("experiment=demo", "crs.targets=[query,query]"))
    assert twice.targets == one.targets == ["query"] and twice.settings == one.settings
    swapped, _ = _record_of(compose_cfg("experiment=demo", "crs.targets=[fc1,key,query]"))
    assert swapped.targets == swapped.settings["targets"] == ["query", "key", "fc1"]


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("optim.lr=0.002", "optim.lr", "0.001"),
        ("data.batch_size=32", "data.batch_size", "64"),
        ("++trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches", "1"),
        ("trainer.precision=bf16-mixed", "trainer.precision", "'32-true'"),
    ],
)
def test_resuming_with_other_training_settings_is_refused(finished_run, tmp_path, override, key,
                                                          value):  # fmt: skip
    """The resumed run would train on with the checkpoint's optimizer state, schedule and data position but
    record the new value: refused, naming the key and the checkpoint's value, before anything is written."""
    run_dir = _copy(finished_run, tmp_path / "run")
    record = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**record, "status": "incomplete"}))
    before = _snapshot(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError) as err:
        train(_compose(run_dir, *RUN, override, f"ckpt_path={last}"))
    assert f"was trained with {key} = {value}" in str(err.value) and f"resume with {key}=" in str(err.value)
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("kept", ["by this version", "by an earlier version"])
def test_a_two_rank_checkpoint_resumed_on_one_process_is_refused(finished_run, tmp_path, kept):
    run_dir = _copy(finished_run, tmp_path / "run")
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["crs"] = [ckpt["crs"][0], ckpt["crs"][0]]  # one CRS state per rank, as a 2-process run saves
    state = ckpt["callbacks"]["MetricsFile"]
    if kept == "by this version":
        state["settings"]["trainer.devices x trainer.num_nodes"] = 2
    else:  # a checkpoint without the settings: its per-rank states tell the world size
        del state["settings"]
    torch.save(ckpt, last)
    record = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**record, "status": "incomplete"}))
    before = _snapshot(run_dir)
    refused = r"num_nodes = 2, this run has 1.*resume with 2 processes \(e.g. trainer=ddp trainer.devices=2\)"
    with pytest.raises(ConfigError, match=refused):
        train(_compose(run_dir, *RUN, f"ckpt_path={last}"))
    assert _snapshot(run_dir) == before


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_resume_refused_late_leaves_the_record_as_it_was(finished_run, tmp_path):
    """A setting only the data can refuse (here: a validation share that leaves no training image) stops
    the resumed run when fitting starts: the earlier launch's record is not turned into `failed`."""
    run_dir = _copy(finished_run, tmp_path / "run")
    record = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**record, "status": "incomplete"}))
    before = (run_dir / "metrics.json").read_bytes()
    last = run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.9999 leaves no training images"):
        train(_compose(run_dir, *RUN, "data.val_fraction=0.9999", f"ckpt_path={last}"))
    assert (run_dir / "metrics.json").read_bytes() == before


def _attached(cfg: DictConfig):
    """The record of `cfg` once its trainer is built (what metrics.json starts with), and the trainer."""
    from vitcrs.callbacks import MetricsFile

    record, settings = _record_of(cfg)
    metrics = MetricsFile(Path(cfg.run_dir) / "metrics.json", record)
    trainer, _ = settings.trainer.build([metrics])
    metrics.attach(trainer)
    return metrics.record, trainer


def test_the_effective_batch_of_accumulated_gradients_is_recorded(compose_cfg):
    record, _ = _attached(compose_cfg("experiment=demo", "++trainer.accumulate_grad_batches=2"))
    assert record.settings["batch_size"] == 64 and record.settings["effective_batch_size"] == 128
    plain, _ = _attached(compose_cfg("experiment=demo"))
    assert "effective_batch_size" not in plain.settings  # the batch itself


@pytest.mark.filterwarnings("ignore:.*AMP with fp16 is not supported on CPU")
def test_the_precision_lightning_runs_is_recorded(compose_cfg):
    record, trainer = _attached(compose_cfg("experiment=demo", "trainer.precision=16-mixed"))
    assert record.settings["precision"] == str(trainer.precision) == "bf16-mixed"  # on a CPU


def test_each_rank_evaluates_its_own_images_and_none_twice():
    """511 test images over 2 ranks: 256 and 255, together each image once (no padded repeats)."""
    from types import SimpleNamespace

    from vitcrs.data import SyntheticSource, VisionDataModule

    def share(rank: int) -> list[int]:
        source = SyntheticSource(num_classes=3, num_train=40, num_test=511, native_size=8)
        datamodule = VisionDataModule(source, batch_size=64, num_workers=0, image_size=8)
        datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        datamodule.setup()
        return [i for batch in datamodule.test_dataloader().batch_sampler for i in batch]

    ranks = [share(0), share(1)]
    assert [len(r) for r in ranks] == [256, 255] and sorted(ranks[0] + ranks[1]) == list(range(511))


# --- refusals that name the key --------------------------------------------------------------------------


@pytest.mark.parametrize("clip", ["0", "-1.0"])
def test_a_gradient_clip_that_lightning_would_ignore_is_refused(compose_cfg, tmp_path, clip):
    refused = rf"trainer.gradient_clip_val={clip} is invalid.*gradient_clip_val=null to train without"
    with pytest.raises(ConfigError, match=refused):
        validate(compose_cfg("experiment=demo", f"trainer.gradient_clip_val={clip}"))
    validate(compose_cfg("experiment=demo", "trainer.gradient_clip_val=null"))  # no clipping, said so


def test_a_gpu_accelerator_without_a_gpu_names_the_key_and_the_fix(compose_cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    refused = r"trainer.accelerator='gpu': torch sees no GPU.*Fix: trainer.accelerator=cpu"
    with pytest.raises(ConfigError, match=refused):
        validate(compose_cfg("experiment=demo", "trainer.accelerator=gpu"))


def test_vitcrs_own_checks_are_not_said_to_be_lightnings(compose_cfg, tmp_path):
    for override, message in [
        ("callbacks.grad_fidelity.every_n_steps=-1", "callbacks.grad_fidelity.every_n_steps=-1 is invalid"),
        ("callbacks.memory.warmup_batches=-2", "callbacks.memory.warmup_batches=-2 is invalid"),
    ]:
        with pytest.raises(ConfigError) as err:
            train(compose_cfg(*QUICK, override))
        assert str(err.value).startswith(message) and "Lightning" not in str(err.value), str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.config.num_attention_heads=5"],
         "model.config.hidden_size=64 is not a multiple of model.config.num_attention_heads=5: each head "
         "would get hidden_size // num_attention_heads features, so attention would be 60 wide, not 64. "
         "Fix: model.config.num_attention_heads=4"),
        (["model.config.image_size=30"],
         "image side 30 (data.image_size, else model.config.image_size) is not a multiple of "
         "model.config.patch_size=4: the patch grid would drop the last 2 pixels of every row and column. "
         "Fix: data.image_size=28"),
    ],
    ids=["heads do not divide the width", "patches do not tile the image"],
)  # fmt: skip
def test_an_architecture_hugging_face_would_build_otherwise_is_refused(compose_cfg, tmp_path, overrides,
                                                                       message):  # fmt: skip
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("experiment=demo", *overrides))
    assert str(err.value).startswith(message), str(err.value)
    assert not (tmp_path / "run").exists()


def test_an_image_folder_with_an_empty_test_class_is_refused(compose_cfg, tmp_path):
    from PIL import Image

    root = tmp_path / "flowers"
    for split in ("train", "test"):
        for name in ("daisy", "rose", "tulip"):
            (root / split / name).mkdir(parents=True)
            if not (split == "test" and name == "rose"):
                Image.new("RGB", (8, 8)).save(root / split / name / "0.png")
    cfg = compose_cfg("experiment=demo", "dataset=imagefolder", f"data.root={root}")
    refused = r"test class folders without images \(rose\): the test accuracy would cover 2 of the 3 classes"
    with pytest.raises(ConfigError, match=refused):
        validate(cfg)


# --- the report ---------------------------------------------------------------------------------------


def test_a_tiny_ratio_is_labelled_as_it_is_not_as_zero(tmp_path):
    from test_report import write_run
    from vitcrs.report import build_report

    write_run(tmp_path / "runs", "0")
    write_run(tmp_path / "runs", "1", ratio=1e-9, test_acc=0.5)
    out = build_report([tmp_path / "runs"], tmp_path / "report")
    rows = [line for line in (out / "accuracy.md").read_text().splitlines() if line.startswith("| 1e-09 |")]
    assert len(rows) == 1 and "| 0 |" not in (out / "accuracy.md").read_text()


@pytest.mark.parametrize("runs", ["unreadable", "failed and incomplete"])
def test_a_report_without_a_complete_run_exits_non_zero(tmp_path, capsys, runs):
    from test_report import write_run
    from vitcrs.report import main

    if runs == "unreadable":
        (tmp_path / "runs" / "0").mkdir(parents=True)
        (tmp_path / "runs" / "0" / "metrics.json").write_text("{not json")
    else:
        write_run(tmp_path / "runs", "0", status="failed", test_acc=None, error="ConfigError: x")
        write_run(tmp_path / "runs", "1", status="incomplete", test_acc=None)
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 1
    out, err = capsys.readouterr()
    assert out == f"{tmp_path / 'report'}\n" and (tmp_path / "report" / "accuracy.md").is_file()  # written
    assert "error: no usable run" in err
    write_run(tmp_path / "runs", "2")  # one complete run: a report of results
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "report2")]) == 0


# --- the fidelity meter ----------------------------------------------------------------------------------


def _fidelity_cfg(out: Path, *overrides: str) -> DictConfig:
    return compose_config(
        "fidelity", f"out_dir={out}", "model=vit_micro", "dataset=synthetic", "data.batch_size=8", *overrides
    )


REFUSED_ROWS = {
    "no targets": ("{targets: [], ratio: 0.3}", [], r"\[0\] \(wta_crs 0.3  norm\): crs.targets=\[\] samples"),
    "min_k keeps every pair": (
        "{targets: [query], ratio: 0.3, min_k: 100000}",
        [],
        r"\[0\] .*min_k=100000 keeps",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED_ROWS))
def test_a_fidelity_row_that_would_be_exact_is_refused_first(tmp_path, name):
    from vitcrs.fidelity.cli import run

    entry, overrides, message = REFUSED_ROWS[name]
    cfg = _fidelity_cfg(tmp_path / "out", f"fidelity.configs=[{entry}]", *overrides)
    with pytest.raises(ConfigError, match=r"fidelity.configs" + message):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_fidelity_rows_are_labelled_with_the_settings_in_effect(tmp_path):
    from vitcrs.fidelity.cli import configurations

    entry = "{targets: lean_block, ratio: 0.3, prob: norm_grad}"
    (config,) = configurations(_fidelity_cfg(tmp_path, f"fidelity.configs=[{entry}]"))
    assert config.prob == "norm" and config.label == "wta_crs 0.3 lean_block norm"  # it draws by ‖g‖·‖x‖


def test_fidelity_help_lists_only_the_groups_it_composes(capsys, monkeypatch):
    import sys

    from vitcrs.fidelity.cli import main

    monkeypatch.setattr(sys, "argv", ["vitcrs.fidelity", "--help"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0
    text = capsys.readouterr().out
    groups = {line.split("=")[0]: line.split("=")[1].split("|") for line in text.splitlines()
              if re.match(r"^\w+=\w", line)}  # fmt: skip
    options = {g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml")) for g in ("dataset", "model")}
    assert groups == options  # each group the meter composes, with every option it has
    assert "trainer:" not in text and "experiment:" not in text and "crs: " not in text


def test_a_checkpoint_state_cannot_make_the_run_delete_files_outside_its_checkpoint_dir(tmp_path):
    """Checkpoint selection deletes the former best checkpoint named by the resumed checkpoint's state: a
    path that leaves the checkpoint dir (`<dir>/../..`, which passes Lightning's own test) is not deleted."""
    from types import SimpleNamespace

    from vitcrs.callbacks import RunDirCheckpoint

    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    selection = RunDirCheckpoint(dirpath=str(checkpoints), monitor="val/acc", mode="max", save_top_k=1)
    trainer = SimpleNamespace(ckpt_path=None)
    outside = str(checkpoints / ".." / ".." / "victim.txt")
    assert not selection._should_remove_checkpoint(trainer, outside, str(checkpoints / "new.ckpt"))
    inside = str(checkpoints / "best-epoch00.ckpt")
    assert selection._should_remove_checkpoint(trainer, inside, str(checkpoints / "new.ckpt"))
