"""Data-parallel training on the CPU: 2 processes (gloo) of `trainer=ddp`, run by `python -m vitcrs.train`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from support.faults import FAULT
from vitcrs.crs import SamplingGenerator
from vitcrs.crs.sampling import sample
from vitcrs.models import ViTClassifier

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec:FutureWarning"),
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo needed"
    ),
]

# Every test runs the default callbacks (progress bar included: rank 0 alone renders it); a run that
# hangs (ranks waiting in different collectives) is killed after this many seconds, failing its test.
DDP_TIMEOUT_S = 150
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
# One optimizer step, exact (ratio 1), no augmentation and no warm-up (the first step has lr > 0).
ONE_STEP = [
    "experiment=demo",
    "crs.ratio=1.0",
    "data.augment=false",
    "optim.warmup_fraction=0",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
]


def _files(root: Path, name: str) -> list[Path]:
    return sorted(root.rglob(name))


def _ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)


def _first_moments(ckpt: dict) -> torch.Tensor:
    """AdamW's exp_avg of every parameter: after one step, (1 - beta1) x the gradient."""
    state = ckpt["optimizer_states"][0]["state"]
    return torch.cat([state[i]["exp_avg"].flatten() for i in sorted(state)])


# Whole validation (205 images) and test (511) splits, which do not divide by 2.
EVAL_ALL = ["trainer.limit_val_batches=null", "trainer.limit_test_batches=null", "data.source.num_test=511"]


def _counted_once(acc: float, images: int) -> bool:
    """Whether `acc` is a count of `images` (a split counted with padding gives k / (images + 1) instead)."""
    return abs(acc * images - round(acc * images)) < 1e-6 * images


@pytest.mark.timeout(2 * DDP_TIMEOUT_S + 60)
def test_two_processes_take_the_same_step_as_one_with_their_joint_batch(run_train, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_train(*ONE_STEP, *EVAL_ALL, "data.batch_size=32", f"hydra.run.dir={single}", cwd=tmp_path)
    # The gradient-fidelity callback is on in the data-parallel run: its all-reduce of the exact gradient must
    # meet the other rank's, must leave the step untouched, and at ratio 1 it finds the gradient exact.
    run_train(*ONE_STEP, *EVAL_ALL, *DDP, "data.batch_size=16", "callbacks.grad_fidelity.every_n_steps=1",
              f"hydra.run.dir={ddp}", cwd=tmp_path, timeout=DDP_TIMEOUT_S, process=True)  # fmt: skip

    # One record, one config, one set of logs and checkpoints: written by rank 0 only.
    assert _files(ddp, "metrics.json") == [ddp / "metrics.json"]
    assert _files(ddp, "config.yaml") == [ddp / ".hydra" / "config.yaml"]
    assert _files(ddp, "metrics.csv") == [ddp / "csv" / "metrics.csv"]
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == sorted(
        p.name for p in (single / "checkpoints").iterdir()
    )
    m = json.loads((ddp / "metrics.json").read_text())
    assert m["status"] == "complete" and m["world_size"] == 2 and m["settings"]["world_size"] == 2
    assert m["settings"]["batch_size"] == 16  # per process
    assert m["peak_mem_allocated_gib"] is None and m["peak_mem_allocated_gib_per_rank"] is None  # CPU
    assert m["fidelity_rel_err"] == 0.0 and m["fidelity_cos"] == pytest.approx(1.0)
    s = json.loads((single / "metrics.json").read_text())
    assert s["world_size"] == 1 and "world_size" not in s["settings"]
    assert s["fidelity_rel_err"] is None  # off by default
    # Validation and test count every image once over the two ranks (205 and 511 do not divide by 2), as
    # the single process does: the same weights, the same accuracies.
    assert _counted_once(m["val_acc"], 205) and _counted_once(m["test_acc"], 511)
    assert abs(m["test_acc"] - s["test_acc"]) <= 1 / 511 and abs(m["val_acc"] - s["val_acc"]) <= 1 / 205

    # The averaged gradient of 2 x 16 images equals the gradient of the 32: same Adam moments, same weights.
    a, b = _ckpt(single), _ckpt(ddp)
    assert a["global_step"] == b["global_step"] == 1
    ga, gb = (_first_moments(c) for c in (a, b))
    assert ga.abs().max() > 0
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6 * float(ga.abs().max()))
    wa, wb = a["state_dict"], b["state_dict"]
    diff = torch.cat([(wa[k].float() - wb[k].float()).abs().flatten() for k in wa])
    # Adam's first step is ~lr * sign(grad) (lr 1e-3): a different batch would move weights by ~2e-3.
    assert diff.max() < 1e-4 and diff.mean() < 1e-7


@pytest.mark.timeout(2 * DDP_TIMEOUT_S + 60)
def test_ranks_draw_their_own_rows_and_a_nan_loss_on_one_rank_stops_every_rank(run_train, tmp_path):
    """One data-parallel run (ratio 0.3, gradient fidelity measured at every step, a checkpoint after every
    step) whose rank 1 gets a NaN batch at step 2: the ranks drew from their own CRS streams until then, and
    every rank stops before that step."""
    run_dir = tmp_path / "run"
    proc = run_train("experiment=demo", *DDP, "data.batch_size=16", "trainer.max_epochs=1",
                     "trainer.limit_train_batches=4", "trainer.num_sanity_val_steps=0",
                     "callbacks.step_checkpoint.every_n_train_steps=1",
                     "callbacks.grad_fidelity.every_n_steps=1",
                     FAULT, "+callbacks.fault.nan_at_step=2", "+callbacks.fault.nan_on_rank=1",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False,
                     timeout=DDP_TIMEOUT_S, process=True)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    # rank 0's loss was finite: it stops because rank 1's was not, in the same step (no rank left waiting)
    assert "training loss became non-finite on another rank at epoch 0, step 2" in out
    ckpt = _ckpt(run_dir)
    assert ckpt["global_step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "failed" and "non-finite on another rank" in m["error"] and m["ratio"] == 0.3
    assert 0.0 < m["fidelity_rel_err"] < 1.0 and 0.0 < m["fidelity_cos"] < 1.0  # sampled, measured on 2 ranks

    per_rank = ckpt["crs"]  # the two steps before: each rank drew from its own stream
    assert [r["generator"]["seed"] for r in per_rank] == [0, 1]  # seed + rank
    states = [r["generator"]["states"]["cpu"] for r in per_rank]
    fresh = [torch.Generator().manual_seed(s).get_state() for s in (0, 1)]
    assert not torch.equal(states[0], states[1])
    assert all(not torch.equal(s, f) for s, f in zip(states, fresh, strict=True))  # both ranks sampled
    # The per-rank running gradient-norm estimates are kept too (each rank sees its own output gradients).
    assert per_rank[0]["grad_norm"].keys() == per_rank[1]["grad_norm"].keys()


def test_rank_seeds_give_different_rows_and_the_module_seeds_by_rank(tiny_vit_config):
    """What the streams are for: with seed + rank, two ranks draw different rows from the same weights."""
    weights = torch.rand(4, 64)
    drawn = []
    for rank in range(2):
        drawn.append(sample(weights, 8, "crs", SamplingGenerator(7 + rank).for_device(weights.device))[0])
    assert not torch.equal(drawn[0], drawn[1])

    module = ViTClassifier(
        model={"name_or_path": None, "attn_implementation": "eager", "config": tiny_vit_config},
        crs={"ratio": 0.5, "targets": ["query"]},
        optim={"lr": 1e-3, "weight_decay": 0.0, "warmup_fraction": 0.0},
        num_labels=3,
        seed=7,
    )
    module._trainer = SimpleNamespace(global_rank=1)  # what Lightning sets before calling setup
    try:
        module.setup("fit")
        assert module.crs.generator.seed == 8
        # each rank keeps its own gradient-norm estimates: DDP is told not to broadcast rank 0's buffers
        estimates = {name for name, _ in module.named_buffers() if ".crs_state.sources." in name}
        # (one per block: the q/k/v sample; crs.targets=[query])
        assert len(estimates) == 2 and set(module._ddp_params_and_buffers_to_ignore) == estimates
        module.crs.generator.manual_seed(0)
        module.setup("test")  # evaluation leaves the stream alone
        assert module.crs.generator.seed == 0
    finally:
        module._trainer = None
