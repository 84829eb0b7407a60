"""prob=sample_cache (the study's per-image gradient-norm cache); prob=norm_grad before its first estimate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from support.faults import FAULT
from support.montecarlo import assert_same_estimate, assert_unbiased, record_draws, weight_estimates
from test_crs import DRAWS, skewed, tiny_vit
from vitcrs.crs import (
    ALL_TARGETS,
    CRSConfig,
    GradNormEMA,
    SampleGradCache,
    attach_sample_cache,
    crs_linear,
    crs_matmul,
    inject,
    sample_cache_bytes_per_image,
    sample_caches,
    training_batch,
    uninjected,
)
from vitcrs.crs import functional as crs_functional
from vitcrs.crs.grad_norm import floored
from vitcrs.crs.sample_cache import TrainingBatch, decode, encode
from vitcrs.train import train

pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec:FutureWarning")


def _cache(size: int, fmt: str = "bfloat16") -> tuple[TrainingBatch, SampleGradCache]:
    batch = TrainingBatch()
    batch.dataset_size = size
    return batch, SampleGradCache(batch, fmt)


@pytest.mark.parametrize("method", ["crs", "wta_crs"])
def test_cached_probabilities_are_unbiased_from_the_first_step(method, monkeypatch):
    """Images 5 and 6 of the batch have entries, 1 and 0 have none (p ∝ ‖x‖ times a stand-in of 1 here, as
    before any write): the estimate of the draw each op makes is unbiased, linear and matmul alike
    (tests/support/montecarlo.py: the op's gradient is the estimate of its draw; 20,000 draws anew)."""
    torch.manual_seed(0)
    cfg = CRSConfig(ratio=0.3, method=method, prob="sample_cache")
    x = skewed(4, 10, 6).requires_grad_()
    w = torch.randn(5, 6, requires_grad=True)
    g = torch.randn(4, 10, 5)
    a, b = skewed(4, 2, 9, 3).requires_grad_(), skewed(4, 2, 3, 7).requires_grad_()
    gm = torch.randn(4, 2, 9, 7)
    batch, lin = _cache(8)
    _, mat_m = _cache(8)
    mat_n = SampleGradCache(batch, "bfloat16")
    batch.indices = torch.tensor([5, 1, 6, 0])
    # entries unlike the true gradients (any positive estimate must give an unbiased draw)
    lin.write(torch.tensor([5, 6]), 0.5 + torch.rand(2, 10))
    mat_n.write(torch.tensor([5, 6]), 0.5 + torch.rand(2, 2, 7))
    lin.estimate = mat_m.estimate = mat_n.estimate = torch.empty(0)  # the stand-in before any write: 1
    exact_w = torch.autograd.grad((F.linear(x, w) * g).sum(), w)[0]
    exact_a, exact_b = torch.autograd.grad(((a @ b) * gm).sum(), (a, b))

    draws = record_draws(monkeypatch, crs_functional)
    (gw,) = torch.autograd.grad((crs_linear(x, w, None, cfg, lin) * g).sum(), w)
    ga, gb = torch.autograd.grad((crs_matmul(a, b, cfg, grad_norms=(mat_m, mat_n)) * gm).sum(), (a, b))
    linear, columns, rows = draws  # the linear's rows, the matmul's columns of b (grad a), rows of a (grad b)
    cached = linear.weights.view(4, 10) / x.detach().norm(dim=-1)
    assert not torch.allclose(cached[0], cached[0, :1].expand(10))  # image 5: its entries, not the stand-in
    torch.testing.assert_close(cached[1], cached[1, :1].expand(10))  # image 1: none, the stand-in
    x_rows, g_rows = x.detach().reshape(-1, 6), g.reshape(-1, 5)
    assert_same_estimate(gw, weight_estimates(linear.row_weights(), g_rows, x_rows))
    assert_unbiased(weight_estimates(linear.redraw(DRAWS), g_rows, x_rows), exact_w)
    a_, b_ = a.detach().double(), b.detach().double()

    def grad_a(c: torch.Tensor) -> torch.Tensor:  # Σ_j c_j G[:, j] B[:, j]ᵀ per slice
        return torch.einsum("...j,...mj,...rj->...mr", c, gm.double(), b_)

    def grad_b(c: torch.Tensor) -> torch.Tensor:  # Σ_i c_i A[i]ᵀ G[i] per slice
        return torch.einsum("...i,...ir,...in->...rn", c, a_, gm.double())

    assert_same_estimate(ga, grad_a(columns.row_weights()))
    assert_same_estimate(gb, grad_b(rows.row_weights()))
    assert_unbiased(grad_a(columns.redraw(DRAWS)), exact_a)
    assert_unbiased(grad_b(rows.redraw(DRAWS)), exact_b)


def test_entries_are_written_in_backward_for_the_batch_and_drawn_from_on_the_next_visit(monkeypatch):
    torch.manual_seed(0)
    cfg = CRSConfig(ratio=0.3, method="crs", prob="sample_cache")
    batch, cache = _cache(6)
    x = skewed(2, 8, 4).requires_grad_()
    w = torch.randn(3, 4, requires_grad=True)
    g = torch.randn(2, 8, 3)
    g[1, :4] = 0  # image 4's first four tokens get no gradient
    batch.indices = torch.tensor([4, 1])
    (crs_linear(x, w, None, cfg, cache) * g).sum().backward()
    entries = decode(cache.entries, "bfloat16")
    assert entries[[0, 2, 3, 5]].isnan().all()  # only the batch's images have entries
    assert torch.equal(cache.entries[[4, 1]], g.norm(dim=-1).to(torch.bfloat16))  # ‖g_i‖ per token

    drawn_from = []
    real = crs_functional.sample
    monkeypatch.setattr(crs_functional, "sample", lambda p, *a: drawn_from.append(p) or real(p, *a))
    batch.indices = torch.tensor([1, 4])  # the next visit of the same images, in another order
    crs_linear(x, w, None, cfg, cache).sum().backward()
    want = x.detach().norm(dim=-1) * floored(entries[[1, 4]], joint=True)
    torch.testing.assert_close(drawn_from[0], want.flatten())
    zero = drawn_from[0].view(2, 8)[1, :4]
    assert (zero > 0).all() and zero.sum() < 1e-2 * drawn_from[0].sum()  # rarely drawn, never impossible


def test_eval_and_unindexed_forwards_never_touch_the_cache():
    model = inject(tiny_vit(layers=1), CRSConfig(ratio=0.3, prob="sample_cache"), ALL_TARGETS)
    attach_sample_cache(model, 4)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), training_batch(model, torch.tensor([0, 1])):
        model(x)  # an evaluation batch: no sampled op runs
    model(x).logits.sum().backward()  # a forward outside any training batch: p ∝ ‖x‖, nothing written
    assert all(c.entries is None and c.estimate.numel() == 0 for c in sample_caches(model).values())
    with training_batch(model, torch.tensor([3, 2])):
        model(x).logits.sum().backward()
    written = [c for c in sample_caches(model).values() if c.entries is not None]
    assert written and all(c.entries.shape[0] == 4 for c in written)


@pytest.mark.parametrize("prob", ["norm_grad", "sample_cache"])
def test_before_any_estimate_rows_are_drawn_with_p_proportional_to_the_row_norm(monkeypatch, prob):
    """The first step of norm_grad (no estimate) and of an empty cache: p ∝ ‖x‖, with its 1/(k·p) scale."""
    torch.manual_seed(0)
    cfg = CRSConfig(ratio=0.3, method="crs", prob=prob)
    x = skewed(3, 10, 6).requires_grad_()
    w = torch.randn(4, 6, requires_grad=True)
    g = torch.randn(3, 10, 4)
    exact = torch.autograd.grad((F.linear(x, w) * g).sum(), w)[0]

    def source():
        if prob == "norm_grad":
            return GradNormEMA(0.9)
        batch, cache = _cache(3)
        batch.indices = torch.arange(3)
        return cache

    draws = record_draws(monkeypatch, crs_functional)
    (gw,) = torch.autograd.grad((crs_linear(x, w, None, cfg, source()) * g).sum(), w)
    (draw,) = draws
    x_rows, g_rows = x.detach().reshape(-1, 6), g.reshape(-1, 4)
    assert_same_estimate(gw, weight_estimates(draw.row_weights(), g_rows, x_rows))
    assert_unbiased(weight_estimates(draw.redraw(DRAWS), g_rows, x_rows), exact)
    ratio = draw.weights / x.detach().norm(dim=-1).flatten()  # p ∝ ‖x‖
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))


def test_the_last_blocks_mlp_gets_cls_rows_only_and_wta_keeps_them_all():
    """Only [CLS] reaches the classifier, so the last block's fc2 gets gradient at row 0 of each image only:
    once estimates exist (norm_grad per position, sample_cache per image), WTA-CRS keeps exactly those rows
    and fc2's weight gradient is exact."""
    for prob in ("norm_grad", "sample_cache"):
        torch.manual_seed(0)
        model = inject(tiny_vit(layers=2), CRSConfig(ratio=0.3, prob=prob), ["fc1", "fc2"])
        attach_sample_cache(model, 4)
        x, idx = torch.randn(4, 3, 16, 16), torch.arange(4)
        fc2 = [m for n, m in model.named_modules() if n.endswith("mlp.fc2")][-1]
        for _ in range(2):  # the first step makes the estimates, the second uses them
            model.zero_grad()
            with training_batch(model, idx):
                model(x).logits.sum().backward()
        sampled = fc2.weight.grad.clone()
        model.zero_grad()
        with uninjected(model):
            model(x).logits.sum().backward()
        torch.testing.assert_close(sampled, fc2.weight.grad, rtol=1e-5, atol=1e-7)


def test_uint8_code_keeps_norms_within_its_step():
    norms = torch.tensor([0.0, 1e-9, 3e-4, 0.02, 1.0, 7.5])
    back = decode(encode(norms, "uint8"), "uint8")
    assert back[0] == 0 and torch.all((back[1:] / norms[1:] - 1).abs() <= 2 ** (0.25 / 2) - 1 + 1e-6)
    _, cache = _cache(3, "uint8")
    cache.write(torch.tensor([2]), norms[None, :])
    assert cache.entries.dtype == torch.uint8 and cache.nbytes == 3 * 6
    assert decode(cache.entries, "uint8")[:2].isnan().all()  # no entry yet


def _run(compose_cfg, tmp_path, *overrides: str) -> dict:
    cfg = compose_cfg(
        "experiment=demo", "data.limit_train=48", "data.batch_size=16", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0", "callbacks.progress_bar=null",
        "trainer.max_epochs=2", "callbacks.step_checkpoint.every_n_train_steps=1", "crs.prob=sample_cache",
        "crs.cache_in_checkpoint=true", "crs.targets=[query,key,value,scores,context]", *overrides,
    )  # fmt: skip
    train(cfg)
    return json.loads((Path(cfg.run_dir) / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_run_with_the_cache_reports_its_memory_and_resumes_exactly(compose_cfg, tmp_path):
    unbroken = _run(compose_cfg, tmp_path, f"run_dir={tmp_path / 'unbroken'}")
    # demo's vit_micro: 65 tokens, width 64, 4 heads, 4 blocks, the study's targets: per block a [65] row for
    # q/k/v, two [4, 65] for the scores, [4, 16] for the context; bf16
    per_image = 4 * (65 + 2 * 4 * 65 + 4 * 16) * 2
    study = ["query", "key", "value", "scores", "context"]
    assert per_image == sample_cache_bytes_per_image(65, 64, 4, 4, study)
    assert unbroken["sample_cache"] == {
        "format": "bfloat16", "images": 48, "bytes_per_image": per_image, "host_bytes": 48 * per_image,
    }  # fmt: skip

    # Stopped at step 5 (the 2nd of epoch 2; 3 steps per epoch) and resumed from the checkpoint of step 4.
    broken = tmp_path / "broken"
    fault = [FAULT, "+callbacks.fault.nan_at_step=4"]
    with pytest.raises(FloatingPointError):
        _run(compose_cfg, tmp_path, f"run_dir={broken}", *fault)
    last = broken / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 4
    entries = saved["crs"][0]["sample_cache"]
    assert entries and not any(e.float().isnan().all(-1).any() for e in entries.values() if e.dim() == 2)
    _run(compose_cfg, tmp_path, f"run_dir={broken}", f"ckpt_path={last}")
    wa, wb = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
              for d in (tmp_path / "unbroken", broken))  # fmt: skip
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit for bit: the resumed run drew the same rows
    assert math.isfinite(unbroken["test_acc"])


def test_the_exact_warm_up_keeps_every_row_and_fills_the_cache():
    cfg = CRSConfig(ratio=0.3, prob="sample_cache", cache_warmup="exact")
    model = inject(tiny_vit(layers=1), cfg, ALL_TARGETS)
    attach_sample_cache(model, 4)
    x = torch.randn(2, 3, 16, 16)
    with training_batch(model, torch.tensor([0, 3]), exact=True):
        model(x).logits.square().sum().backward()
    sampled = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with uninjected(model):
        model(x).logits.square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(sampled[n], p.grad, rtol=1e-5, atol=1e-6)
    written = [c.entries for c in sample_caches(model).values() if c.entries is not None]
    assert len(written) == 7 and all(not e[[0, 3]].float().isnan().any() for e in written)


def test_an_overflowing_step_leaves_the_estimates_as_they_were():
    """A GradScaler (16-mixed) skips a step whose gradients overflow: its norms must not poison estimates."""
    ema = GradNormEMA(0.5)
    ema.update(torch.tensor([[2.0, 4.0]]))
    ema.update(torch.tensor([[float("inf"), 1.0]]))
    assert torch.equal(ema.estimate, torch.tensor([2.0, 4.0]))
    _, cache = _cache(3)
    cache.write(torch.tensor([0, 1]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    cache.write(torch.tensor([2, 1]), torch.tensor([[float("nan"), 8.0], [float("inf"), 8.0]]))
    entries = decode(cache.entries, "bfloat16")
    assert entries[1:, 0].isnan().all() and torch.equal(entries[1:, 1], torch.tensor([8.0, 8.0]))
    torch.testing.assert_close(cache.estimate, torch.tensor([2.0, 0.9 * 3.0 + 0.1 * 8.0]))


def test_the_fidelity_meter_primes_the_cache_with_earlier_visits_of_the_measured_batch(monkeypatch):
    from test_fidelity import STUDY, _measure_tiny_vit
    from vitcrs.crs import sample_cache
    from vitcrs.fidelity.meter import Configuration

    reads = []
    real = sample_cache.SampleGradCache.read

    def spy(self, indices, shape, device):
        cached = self.entries is not None and not decode(self.entries[indices], self.fmt).isnan().any()
        reads.append((indices.tolist(), cached))
        return real(self, indices, shape, device)

    monkeypatch.setattr(sample_cache.SampleGradCache, "read", spy)
    result = _measure_tiny_vit([Configuration("wta_crs", STUDY, 0.5, "sample_cache")])["configurations"][0]
    assert result["prime_passes"] == 1 and 0.0 < result["rel_err"]["mean"] < 1.0
    assert reads and all(idx == list(range(8)) for idx, _ in reads)
    assert any(cached for _, cached in reads)  # the draws read what the prime pass wrote
