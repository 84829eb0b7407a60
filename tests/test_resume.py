"""Resumption: a run killed mid-epoch and resumed ends exactly like an unbroken one; the parts that do it."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from support.faults import FAULT
from vitcrs.data import (
    BatchCollate,
    EpochSampler,
    ImageTensorDataset,
    SyntheticSource,
    TrainLoader,
    VisionDataModule,
)
from vitcrs.run_dir import checkpoint_run_dir, hydra_output_subdir, resolve_ckpt_path

pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec:FutureWarning")

# Two short epochs of 4 steps, a checkpoint after every step, CRS with running gradient-norm estimates, and
# dropout and augmentation on: everything a resumed run must restore to train as the unbroken one does.
RUN = [
    "experiment=demo",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "data.batch_size=16",
    "callbacks.progress_bar=null",
    "callbacks.step_checkpoint.every_n_train_steps=1",
    "crs.prob=norm_grad",
    "crs.targets=[query,key,value,scores,context]",  # sampled ops with running estimates, dropout allowed
    "model.config.hidden_dropout_prob=0.1",
]
KILL_AT = 6  # the 3rd step of the 2nd epoch
KILL = [FAULT, f"+callbacks.fault.kill_at_step={KILL_AT}"]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def test_killed_run_resumes_to_the_same_result(run_train, tmp_path):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    run_train(*RUN, f"hydra.run.dir={unbroken}", cwd=tmp_path)

    killed = run_train(*RUN, *KILL, f"hydra.run.dir={broken}", cwd=tmp_path, check=False, process=True)
    assert killed.returncode == -signal.SIGKILL
    record = json.loads((broken / "metrics.json").read_text())
    assert record["status"] == "incomplete" and record["epochs"] == 1  # the kill left a whole, marked file
    saved = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == KILL_AT  # the step checkpoint just before the kill
    config = (broken / ".hydra" / "config.yaml").read_bytes()

    # The checkpoint's path alone puts the resumed run back into its own run dir.
    run_train(*RUN, f"ckpt_path={broken / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path)

    a, b = (json.loads((d / "metrics.json").read_text()) for d in (unbroken, broken))
    assert b["status"] == "complete"
    for key in ("val_acc", "test_acc", "epochs", "saved_bytes_per_step"):
        assert a[key] == b[key], key
    wa, wb = _weights(unbroken), _weights(broken)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit for bit
    best = [sorted(p.name for p in (d / "checkpoints").glob("best-*.ckpt")) for d in (unbroken, broken)]
    assert best[0] == best[1]
    # The run dir keeps the first launch's config; the resumed launch's config sits next to it.
    assert (broken / ".hydra" / "config.yaml").read_bytes() == config
    assert len(list((broken / ".hydra").glob("*/config.yaml"))) == 1
    assert (broken / "csv" / "metrics.segment-1.csv").is_file()


@pytest.mark.timeout(300)
def test_a_moved_run_resumes_from_its_own_checkpoints_and_keeps_its_figures(run_train, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    run = ["experiment=demo", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
           "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "data.batch_size=16",
           "trainer.num_sanity_val_steps=0", "callbacks.progress_bar=null"]  # fmt: skip
    # Killed once training and selection are done, as the test split starts.
    kill = [FAULT, "+callbacks.fault.kill_at_test=true"]
    killed = run_train(*run, *kill, f"hydra.run.dir={old}", cwd=tmp_path, check=False, process=True)
    assert killed.returncode == -signal.SIGKILL
    before = json.loads((old / "metrics.json").read_text())
    assert before["status"] == "incomplete" and before["epochs"] == 1 and before["saved_bytes_per_step"] > 0
    assert len(list((old / "checkpoints").glob("best-*.ckpt"))) == 1

    old.rename(new)  # e.g. onto another file system, or under a cluster's results folder
    run_train(*run, f"ckpt_path={new / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path)

    after = json.loads((new / "metrics.json").read_text())
    assert after["status"] == "complete" and after["test_acc"] is not None  # the moved best checkpoint tested
    for key in ("epochs", "val_acc", "saved_bytes_per_step", "saved_bytes_per_step_exact"):
        assert after[key] == before[key], key  # nothing left to train: the figures come from the checkpoint
    assert str(old) not in (new / "metrics.json").read_text() and not old.exists()


# --- ckpt_path and run-dir resolution -----------------------------------------------------------------


def test_ckpt_path_last_resolves_in_the_run_dir(tmp_path, caplog):
    assert resolve_ckpt_path("last", tmp_path) is None  # nothing to resume: a fresh start, with a warning
    assert "starts from scratch" in caplog.text
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert resolve_ckpt_path("last", tmp_path) == str(last)
    assert resolve_ckpt_path("/some/where.ckpt", tmp_path) == "/some/where.ckpt"
    assert resolve_ckpt_path(None, tmp_path) is None


def test_a_checkpoint_path_selects_its_run_dir(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "epoch3.ckpt"
    default = str(tmp_path / "new")
    assert checkpoint_run_dir(str(ckpt), default) == default  # not there (yet): never a guessed dir
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    assert checkpoint_run_dir(str(ckpt), default) == str(tmp_path / "run")
    elsewhere = tmp_path / "copied.ckpt"
    elsewhere.write_bytes(b"x")
    assert checkpoint_run_dir(str(elsewhere), default) == default
    assert checkpoint_run_dir(None, default) == default and checkpoint_run_dir("last", default) == default


def test_a_reused_run_dir_keeps_its_hydra_config(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert hydra_output_subdir(tmp_path, "T") == ".hydra"
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("a: 1\n")
    assert hydra_output_subdir(tmp_path, "T") == ".hydra/T"
    monkeypatch.setenv("SLURM_PROCID", "3")  # a non-first task of a multi-task SLURM job writes none
    assert hydra_output_subdir(tmp_path, "T") is None


# --- the training loader (vitcrs.data.train_loader) -----------------------------------------------------


def _loader(
    seed: int,
    n: int = 50,
    batch_size: int = 8,
    augment: bool = True,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    indices: bool = False,
) -> TrainLoader:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    images = images + torch.arange(8, dtype=torch.uint8).view(1, 1, 1, 8)  # crops and flips show
    dataset = ImageTensorDataset(images, torch.arange(n))
    sampler = EpochSampler(dataset, batch_size, seed, rank, world_size)
    return TrainLoader(dataset, sampler, BatchCollate(augment), indices=indices, num_workers=workers)


def _epoch(loader: TrainLoader, epoch: int) -> list[tuple[torch.Tensor, ...]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_loader_order_is_a_function_of_seed_and_epoch_and_spares_the_global_rng():
    a, b = _loader(seed=3), _loader(seed=3)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = _epoch(a, 0)
    assert torch.equal(torch.get_rng_state(), before)  # shuffling and augmentation draw from their own seeds
    again = _epoch(b, 0)
    assert all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(first, again, strict=True))
    labels = torch.cat([y for _, y in first])
    assert sorted(labels.tolist()) == list(range(50)) and labels.tolist() != list(range(50))
    assert torch.cat([y for _, y in _epoch(a, 1)]).tolist() != labels.tolist()  # a new order each epoch
    assert len(a) == 7


def test_loader_batches_do_not_depend_on_worker_processes():
    main = _epoch(_loader(seed=2), 1)
    workers = _epoch(_loader(seed=2, workers=2), 1)
    assert all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(main, workers, strict=True))
    plain = _epoch(_loader(seed=2, augment=False), 1)  # same order, no crop/flip
    assert all(torch.equal(u, v) for (_, u), (_, v) in zip(main, plain, strict=True))
    assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(main, plain, strict=True))


def test_ranks_split_each_step_of_the_single_process_order():
    """Step j of a W-rank run with batch b sees the images of step j of a 1-rank run with batch W*b."""
    single = _epoch(_loader(seed=1, batch_size=8, augment=False), 0)
    ranks = [_epoch(_loader(seed=1, batch_size=4, augment=False, rank=r, world_size=2), 0) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 7  # 50 images: 25 per rank
    for step, (_, labels) in enumerate(single[:-1]):  # the last step is padded on the ranks
        together = torch.cat([ranks[r][step][1] for r in range(2)])
        assert sorted(together.tolist()) == sorted(labels.tolist())
    covered = {int(y) for r in range(2) for _, ys in ranks[r] for y in ys}
    assert covered == set(range(50))


def test_loader_resumes_after_the_consumed_images():
    full = _epoch(_loader(seed=5), 2)
    partial = _loader(seed=5)
    partial.sampler.set_epoch(2)
    it = iter(partial)
    for _ in range(3):
        next(it)
    state = partial.state_dict()
    assert state == {"epoch": 2, "consumed": 24, "seed": 5}

    resumed = _loader(seed=5)
    resumed.load_state_dict(state)
    rest = _epoch(resumed, 2)
    assert len(rest) == len(full) - 3
    for (x, y), (u, v) in zip(rest, full[3:], strict=True):
        assert torch.equal(x, u) and torch.equal(y, v)  # same images, same augmentation
    assert len(_epoch(resumed, 3)) == len(full)  # the next epoch is whole again


def test_a_state_from_another_epoch_is_ignored():
    loader = _loader(seed=5)
    loader.load_state_dict({"epoch": 0, "consumed": 50, "seed": 5})  # saved at the end of epoch 0
    assert len(_epoch(loader, 1)) == 7


def test_batches_carry_their_dataset_indices_when_asked():
    """crs.prob=sample_cache keys its cache by the third element; the images and labels stay the same."""
    plain = _epoch(_loader(seed=4), 0)
    keyed = _epoch(_loader(seed=4, indices=True), 0)
    for (x, y), (u, v, index) in zip(plain, keyed, strict=True):
        assert torch.equal(x, u) and torch.equal(y, v)
        assert index.dtype == torch.int64 and index.tolist() == y.tolist()  # the labels are the indices here


def test_the_data_module_state_resumes_its_training_loader():
    """Lightning keeps the data module's state_dict in checkpoints and restores it before the training loader
    is built (or after, when configure_optimizers built it first): either way the epoch goes on exactly."""

    def datamodule() -> VisionDataModule:
        source = SyntheticSource(num_classes=3, num_train=40, num_test=4, native_size=8)
        return VisionDataModule(source, batch_size=4, num_workers=0, val_fraction=0, image_size=8, seed=7)

    run = datamodule()
    full = _epoch(run.train_dataloader(), 1)
    partial = run.train_dataloader()
    partial.sampler.set_epoch(1)
    batches = iter(partial)
    for _ in range(4):
        next(batches)
    state = run.state_dict()
    assert state == {"train_loader": {"epoch": 1, "consumed": 16, "seed": 7}}

    restored_first = datamodule()
    restored_first.load_state_dict(state)
    built_first = datamodule()
    loader = built_first.train_dataloader()
    built_first.load_state_dict(state)
    for rest in (_epoch(restored_first.train_dataloader(), 1), _epoch(loader, 1)):
        assert len(rest) == len(full) - 4
        assert all(
            torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(rest, full[4:], strict=True)
        )


def test_a_gpu_checkpoint_loads_on_a_cpu_only_machine(tiny_vit_config, tmp_path):
    """The CRS stream of a CUDA generator is not used where there is no GPU, not a crash; this checkpoint
    (written by the previous version, with one stream per device) also has the CPU stream, which resumes,
    and its running gradient-norm estimates are restored."""
    from vitcrs.crs import grad_norm_sources
    from vitcrs.models import ViTClassifier

    module = ViTClassifier(
        model={"name_or_path": None, "attn_implementation": "eager", "config": tiny_vit_config},
        crs={"ratio": 0.5, "targets": ["query"]},
        optim={"lr": 1e-3, "weight_decay": 0.0, "warmup_fraction": 0.0},
        num_labels=3,
    )
    cpu_state = torch.Generator().manual_seed(4).get_state()
    rng = {"seed": 4, "states": {"cpu": cpu_state, "cuda:7": cpu_state.clone()}}
    qkv = next(name for name in grad_norm_sources(module.net) if name.endswith(".qkv"))
    # that version named a source by its module's path: "vit.layers.0.attention.qkv"
    old_qkv = qkv.removesuffix(".qkv") + ".attention.qkv"
    grad_norms = {old_qkv: {"momentum": 0.9, "value": torch.tensor([1.0, 2.0])}}
    checkpoint = {
        "crs": {"grad_norms": grad_norms, "rng": rng, "per_rank": [{"grad_norms": grad_norms, "rng": rng}]}
    }
    module.on_load_checkpoint(checkpoint)
    stream = module.crs.generator
    assert stream.seed == 4 and torch.equal(stream.for_device(torch.device("cpu")).get_state(), cpu_state)
    assert torch.equal(grad_norm_sources(module.net)[qkv].estimate, torch.tensor([1.0, 2.0]))
