"""Gradient fidelity: the meter's error against the analytic CRS variance, exactness at ratio 1, the bias
check, the training callback's records, and `python -m vitcrs.fidelity` end to end (CPU, tiny models)."""

from __future__ import annotations

import csv
import json
import logging
import runpy
import sys
from pathlib import Path

import pytest
import torch

from conftest import QUICK, TINY_VIT, compose_config
from vitcrs.callbacks import GradFidelityMonitor
from vitcrs.crs import CRSConfig, crs_linear
from vitcrs.errors import ConfigError
from vitcrs.fidelity.cli import configurations
from vitcrs.fidelity.meter import Configuration, Groups, compare_draws, measure
from vitcrs.fidelity.render import group_table, summary_table
from vitcrs.models import build_vit
from vitcrs.models.fidelity import grad_fidelity, parameter_block, parameter_kind
from vitcrs.record import RunRecord
from vitcrs.train import train

pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec:FutureWarning")

STUDY = ("query", "key", "value", "scores", "context")
LINEARS = ("query", "key", "value", "attn_output", "fc1", "fc2")


# --- a single linear layer: the meter's statistics against the maths --------------------------------------


def _linear_problem(coherent: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [n, d_in] with unequal row norms, W [d_out, d_in], b [d_out], and the output gradient R [n, d_out].
    coherent: rows of x and of R are a shared direction plus 30 % noise (as token rows of a real layer tend to
    be), so the exact gradient is large next to the sampling error; else independent rows."""
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out = 64, 16, 8
    x, r = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    if coherent:
        x, r = torch.randn(d_in, generator=g) + 0.3 * x, torch.randn(d_out, generator=g) + 0.3 * r
    x = x * torch.rand(n, 1, generator=g)
    w = torch.randn(d_out, d_in, generator=g, requires_grad=True)
    b = torch.randn(d_out, generator=g, requires_grad=True)
    return x, w, b, r


def _linear_sampler(cfg: CRSConfig, scale: float = 1.0, coherent: bool = False):
    """sample() for `compare_draws`: the gradients of loss = Σ R ⊙ crs_linear(x, W, b) (times `scale`)."""
    x, w, b, r = _linear_problem(coherent)

    def sample() -> tuple[list[torch.Tensor], float]:
        grads = torch.autograd.grad((crs_linear(x, w, b, cfg) * r).sum(), [w, b])
        return [scale * g for g in grads], 0.0

    with torch.no_grad():
        exact = [r.T @ x, r.sum(0)]
    return sample, exact, (x, r)


@pytest.mark.slow
def test_meter_error_equals_the_analytic_crs_variance(fresh_crs_stream):
    """Plain CRS, p_i ∝ ‖x_i‖, k i.i.d. draws, Ĝ = (1/k) Σ_t g_{i_t} x_{i_t}ᵀ / p_{i_t}:
    E‖Ĝ − G‖² = (1/k) (Σ_i ‖g_i‖² ‖x_i‖² / p_i − ‖G‖²) = (1/k) ((Σ_j ‖x_j‖)(Σ_i ‖g_i‖² ‖x_i‖) − ‖G‖²);
    the bias gradient is exact, so rel_err = that / (‖G‖² + ‖grad b‖²)."""
    cfg = CRSConfig(ratio=0.25, method="crs")
    sample, exact, (x, r) = _linear_sampler(cfg)
    k = cfg.num_samples(x.shape[0])
    xn, gn = x.norm(dim=1), r.norm(dim=1)
    g_sq = float(exact[0].square().sum())
    analytic = (
        (float(xn.sum() * (gn.square() * xn).sum()) - g_sq) / k / (g_sq + float(exact[1].square().sum()))
    )
    result = compare_draws(sample, exact, draws=1000, groups=Groups.of(["weight", "bias"]), alpha=1e-3)
    err = result["rel_err"]
    assert abs(err["mean"] - analytic) < 4 * err["se"], (err, analytic)
    assert err["se"] < 0.05 * analytic  # the check above is tight, not vacuous
    assert not result["bias"]["biased"]


@pytest.mark.slow
def test_bias_check_flags_a_planted_5_percent_scale_bias(fresh_crs_stream):
    cfg = CRSConfig(ratio=0.5, method="crs")
    groups = Groups.of(["weight", "bias"])
    sample, exact, _ = _linear_sampler(cfg, coherent=True)
    unbiased = compare_draws(sample, exact, draws=200, groups=groups, alpha=1e-3)["bias"]
    assert not unbiased["biased"] and 0.7 < unbiased["ratio"] < 1.4 and unbiased["p_value"] > 1e-3, unbiased
    sample, exact, _ = _linear_sampler(cfg, scale=1.05, coherent=True)
    biased = compare_draws(sample, exact, draws=200, groups=groups, alpha=1e-3)["bias"]
    assert biased["biased"] and biased["p_value"] < 1e-6, biased
    # ‖b‖² / ‖g‖² = 0.05² = 0.0025: the unbiased estimate of it lands near
    assert biased["rel_bias_sq"] == pytest.approx(0.0025, rel=0.5)


def test_grad_fidelity_definition():
    exact = [torch.tensor([3.0, 4.0]), torch.tensor([0.0])]
    assert grad_fidelity(exact, exact) == (0.0, 1.0)
    rel_err, cos = grad_fidelity([torch.tensor([3.0, 0.0]), None], exact)
    assert rel_err == pytest.approx(16 / 25) and cos == pytest.approx(9 / 15)


def test_parameter_blocks_and_kinds():
    assert parameter_kind("vit.layers.3.attention.q_proj.weight") == "query"
    assert parameter_kind("vit.layers.3.attention.o_proj.bias") == "attn_output"
    assert parameter_kind("vit.layers.0.mlp.fc2.weight") == "fc2"
    assert parameter_kind("vit.layers.0.layernorm_after.weight") == "layernorm"
    assert parameter_kind("vit.embeddings.patch_embeddings.projection.weight") == "embeddings"
    assert parameter_block("vit.layers.11.mlp.fc1.bias") == "11"
    assert parameter_block("vit.embeddings.cls_token") == "embeddings"
    assert parameter_block("vit.layernorm.weight") == "final norm"


# --- a tiny ViT: exact at ratio 1, error falls as the ratio rises -----------------------------------------


def _measure_tiny_vit(configs: list[Configuration]) -> dict:
    torch.manual_seed(0)
    model = build_vit(None, 4, "eager", dict(TINY_VIT))
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)
    ]
    return measure(model, batches, configs, draws=4, prime_passes=1, seed=0, warmup_batches=batches[1:2],
                   lr=1e-3)  # fmt: skip


@pytest.fixture(scope="module")
def vit_results():
    return _measure_tiny_vit([
        Configuration("wta_crs", STUDY, 1.0),
        Configuration("crs", LINEARS, 1.0, "norm_grad"),
        *(Configuration("wta_crs", STUDY, r) for r in (0.2, 0.5, 0.8)),
    ])  # fmt: skip


def test_error_is_exactly_zero_at_ratio_one(vit_results):
    for result in vit_results["configurations"][:2]:
        assert result["rel_err"]["mean"] == 0.0 and result["cos"]["mean"] == pytest.approx(1.0)
        assert all(v["mean"] == 0.0 for v in result["per_block"].values())
        assert result["bias"]["biased"] is False and result["bias"]["ratio"] is None
    assert vit_results["configurations"][1]["prime_passes"] == 1  # norm_grad learns: primed
    assert vit_results["configurations"][0]["prime_passes"] == 0  # norm learns nothing: not primed


def test_error_falls_as_the_ratio_rises(vit_results):
    errors = [c["rel_err"]["mean"] for c in vit_results["configurations"][2:]]
    assert errors[0] > errors[1] > errors[2] > 0.0, errors
    noise = vit_results["exact"]["noise"]
    for c in vit_results["configurations"][2:]:
        assert c["err_over_noise"] == pytest.approx(c["rel_err"]["mean"] / noise)
        assert set(c["per_block"]) == {"embeddings", "0", "1", "final norm"}
        assert {"query", "key", "value", "fc1", "layernorm", "embeddings"} <= set(c["per_kind"])


def test_each_configuration_is_reproducible_on_its_own(vit_results):
    """Same seed, same draws, whichever configurations ran before (each restarts the CRS stream)."""
    again = _measure_tiny_vit([Configuration("wta_crs", STUDY, 0.5)])["configurations"][0]
    assert again["rel_err_per_draw"] == vit_results["configurations"][3]["rel_err_per_draw"]


def test_split_budget_and_bfloat16_stream_rows_are_labelled_apart_from_the_default():
    """crs.budget=split learns its split from earlier passes: primed like norm_grad; crs.keep_dtype=bfloat16
    recomputes from a rounded stream, not primed; the rows say which is which."""
    results = _measure_tiny_vit([
        Configuration("wta_crs", ("lean_block",), 0.3),
        Configuration("wta_crs", ("lean_block",), 0.3, budget="split"),
        Configuration("wta_crs", ("lean_block",), 0.3, keep_dtype="bfloat16"),
    ])  # fmt: skip
    uniform, split, bf16 = results["configurations"]
    assert uniform["prime_passes"] == bf16["prime_passes"] == 0 and split["prime_passes"] == 1
    assert (uniform["budget"], split["budget"]) == ("uniform", "split")
    assert split["label"] == "wta_crs 0.3 lean_block norm split"
    assert bf16["label"] == "wta_crs 0.3 lean_block norm bfloat16 stream" and bf16["keep_dtype"] == "bfloat16"
    assert split["rel_err_per_draw"] != uniform["rel_err_per_draw"]
    # the same draws from a rounded stream: errors within a hair of the default's
    assert bf16["rel_err_per_draw"] != uniform["rel_err_per_draw"]
    assert bf16["rel_err_per_draw"] == pytest.approx(uniform["rel_err_per_draw"], rel=0.05)
    summary = summary_table(results)
    assert summary[0].startswith("| Method | Ratio | Targets | Prob | Budget | Kept stream |")
    assert "| wta_crs | 0.3 | lean_block | norm | uniform | as computed |" in summary[2]
    assert "| wta_crs | 0.3 | lean_block | norm | split | as computed |" in summary[3]
    assert "| wta_crs | 0.3 | lean_block | norm | uniform | bfloat16 |" in summary[4]
    # every row of every table has the header's cells (the exact and noise rows included)
    kinds = group_table(results, "per_kind", results["kinds"])
    assert all(len({row.count("|") for row in t}) == 1 for t in (summary, kinds))


# --- the configuration ------------------------------------------------------------------------------------


def _compose_fidelity(*overrides: str):
    return compose_config("fidelity", "out_dir=unused", *overrides)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (
            "fidelity.configs=[{method: crs, targets: [query], ratio: 0}]",
            r"fidelity\.configs\[0\]: crs\.ratio=0",
        ),
        ("fidelity.configs=[{targets: [query], ratio: 0.5, probb: norm}]", r"fidelity\.configs\[0\].*probb"),
        ("fidelity.configs=[{targets: [nope], ratio: 0.5}]", r"fidelity\.configs\[0\].*unknown names"),
        ("fidelity.configs=[{targets: nope, ratio: 0.5}]", r"fidelity\.configs\[0\]: no target set named"),
        ("fidelity.configs=[]", r"fidelity\.configs"),
    ],
)
def test_bad_configuration_names_the_entry(override, match):
    with pytest.raises(ConfigError, match=match):
        configurations(_compose_fidelity(override))


def test_configurations_from_the_command_line():
    cfg = _compose_fidelity(
        "model=vit_micro", "fidelity.configs=[{targets: [value, query], ratio: 0.3, prob: norm_grad}]"
    )
    (config,) = configurations(cfg)
    assert config == Configuration("wta_crs", ("query", "value"), 0.3, "norm_grad")
    # a named set of vitcrs.crs.TARGET_SETS, as conf/fidelity.yaml and scripts/run_fidelity.sh give them
    cfg = _compose_fidelity("model=vit_micro", "fidelity.configs=[{targets: lean, ratio: 0.3}]")
    (config,) = configurations(cfg)
    assert config.targets == ("query", "key", "value", "attn_output", "mlp")
    study, linears, lean = configurations(_compose_fidelity())  # conf/fidelity.yaml's three
    assert [c.targets for c in (study, linears, lean)] == [
        ("query", "key", "value", "scores", "context"),
        ("query", "key", "value", "attn_output", "fc1", "fc2"),
        ("query", "key", "value", "attn_output", "mlp"),
    ]


# --- the training callback --------------------------------------------------------------------------------


def _csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("fidelity/rel_err")]


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_callback_logs_fidelity_under_gradient_accumulation(compose_cfg, tmp_path, caplog, ratio):
    """Every optimizer step (2 micro-batches each) logs fidelity/rel_err and fidelity/cos; at ratio 1 the
    sampled gradient is the exact one, so rel_err is exactly 0 only if the callback replays the same
    micro-batches with the same scaling."""
    cfg = compose_cfg(
        *QUICK, "trainer.limit_train_batches=4", "+trainer.accumulate_grad_batches=2", f"crs.ratio={ratio}",
        "callbacks.grad_fidelity.every_n_steps=1", "callbacks.progress_bar=null",
        "trainer.num_sanity_val_steps=0",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        train(cfg)
    rows = _csv_rows(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == [0, 1]
    rel, cos = [float(r["fidelity/rel_err"]) for r in rows], [float(r["fidelity/cos"]) for r in rows]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["fidelity_rel_err"] == pytest.approx(sum(rel) / 2) and m["fidelity_cos"] == pytest.approx(
        sum(cos) / 2
    )
    warnings = [r for r in caplog.records if "activation" in r.getMessage()]
    if ratio == 1.0:
        assert rel == [0.0, 0.0] and cos == pytest.approx([1.0, 1.0])
        assert not warnings  # nothing is sampled at ratio 1
    else:
        assert all(0.0 < v < 1.0 for v in rel) and all(0.0 < c < 1.0 for c in cos)
        assert len(warnings) == 1 and "callbacks.grad_fidelity.every_n_steps" in warnings[0].getMessage()


def test_callback_off_reports_null():
    record = RunRecord(fidelity_rel_err=1.0, fidelity_cos=1.0)
    GradFidelityMonitor().fill(record)
    assert (record.fidelity_rel_err, record.fidelity_cos) == (None, None)
    with pytest.raises(ValueError, match="every_n_steps"):
        GradFidelityMonitor(every_n_steps=-1)


# --- python -m vitcrs.fidelity ----------------------------------------------------------------------------


@pytest.mark.slow
def test_meter_app_writes_its_three_files(tmp_path, monkeypatch):
    """`python -m vitcrs.fidelity ...` (its __main__ and Hydra app, run in this process)."""
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [
        "vitcrs.fidelity", "model=vit_micro", "dataset=synthetic", "data.batch_size=8",
        "fidelity.draws=3", "fidelity.noise_batches=2", "fidelity.warmup_steps=1", "fidelity.prime_passes=1",
        "fidelity.configs=[{method: crs, targets: [query, key, value, scores, context], ratio: 0.3},"
        "{targets: [query, key, value, attn_output, mlp], ratio: 0.3, prob: norm_grad}]",
        f"hydra.run.dir={out}",
    ])  # fmt: skip
    runpy.run_module("vitcrs.fidelity", run_name="__main__")
    data = json.loads((out / "fidelity.json").read_text())
    assert [c["label"] for c in data["configurations"]] == [
        "crs 0.3 query,key,value,scores,context norm",
        "wta_crs 0.3 query,key,value,attn_output,mlp norm_grad",
    ]
    assert data["settings"]["model"] == "vit_micro" and data["settings"]["batch_size"] == 8
    assert data["exact"]["batches"] == 2 and data["exact"]["noise"] > 0
    for c in data["configurations"]:
        assert c["rel_err"]["n"] == 3 and c["err_over_noise"] > 0 and c["time_vs_exact"] > 0
    md = (out / "fidelity.md").read_text()
    assert md.count("\n| Method | Ratio | Targets | Prob |") == 3
    assert "## Error per parameter kind" in md and "## Error per block" in md
    assert "python -m vitcrs.fidelity model=vit_micro" in md
    assert (out / "fidelity.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
