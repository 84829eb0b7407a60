"""vitcrs.bench: measured saved-for-backward bytes against the analytic ideal, and the CPU command line."""

from __future__ import annotations

import gc
import json
import runpy
import sys
import weakref

import pytest
import torch

from vitcrs import bench
from vitcrs.bench import BenchConfig, ModelSpec, expand, measure
from vitcrs.crs import TARGET_SETS, CRSConfig

PRECISIONS = ["fp32", "bf16-mixed"]
TINY = ["--model", "vit_tiny", "--layers", "1", "--image-size", "64", "--batch-size", "2", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("fresh_crs_stream")


# ---------------------------------------------------------------- one ViT-B/16 block vs the analytic model
# one block of ViT-B/16 (width 768, 12 heads, 197 tokens), and of a small ViT of the same patch grid
SMALL = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256, "image_size": 64}
BLOCKS = {"vit_b16": (197, 768, 12, 3072), "small": (17, 64, 4, 256)}


@pytest.mark.parametrize(
    ("attn", "precision", "block"),
    [("eager", "fp32", "vit_b16"), ("eager", "bf16-mixed", "small"), ("sdpa", "fp32", "small"),
     ("sdpa", "bf16-mixed", "small")],
)  # fmt: skip
@pytest.mark.slow
def test_block_saved_bytes_are_within_5_percent_of_the_analytic_ideal(attn, precision, block):
    """One block (batch 2) at ratio 0.3, each target set: ViT-B/16's in eager fp32, a small one otherwise."""
    spec = ModelSpec("vit_b16", overrides={"num_hidden_layers": 1, **(SMALL if block == "small" else {})})
    batch = 2
    exact_cfg = bench.grid.exact_config(attn, precision, False)
    model = bench.build(spec, exact_cfg, torch.device("cpu"), seed=0)
    shape = bench.block_shape(bench.architecture(model), batch)
    assert (shape.tokens, shape.hidden, shape.heads, shape.intermediate) == BLOCKS[block]
    autocast = precision == "bf16-mixed"
    exact = bench.measured_block_saved_bytes(model, batch, precision)
    exact_ideal = bench.analytic_block_saved_bytes(shape, attn, autocast)
    assert exact == pytest.approx(exact_ideal, rel=0.05)

    checked = []
    for targets in bench.BENCH_TARGET_SETS:
        cfg = BenchConfig("wta_crs", 0.3, targets, attn, precision, False)
        if cfg.skip_reason():  # the attention matmuls exist only with eager attention
            assert attn == "sdpa" and targets in ("study", "all", "lean_all")
            continue
        model = bench.build(spec, cfg, torch.device("cpu"), seed=0)
        measured = bench.measured_block_saved_bytes(model, batch, precision)
        ideal = bench.analytic_block_saved_bytes(
            shape, attn, autocast, CRSConfig(ratio=0.3), cfg.target_names
        )
        assert measured == pytest.approx(ideal, rel=0.05), targets
        assert measured < exact
        checked.append(targets)
    eager = ["study", "linears", "all", "lean", "lean_all", "lean_block"]
    assert checked == (eager if attn == "eager" else ["linears", "lean", "lean_block"])


def test_sdpa_model_differs_from_eager_by_the_attention_internals():
    shape = bench.BlockShape(64, 197, 768, 12, 3072, 12)
    probs = 64 * 12 * 197 * 197
    lse = 64 * 12 * 197 * 4
    eager32, sdpa32 = (bench.analytic_block_saved_bytes(shape, a, False) for a in ("eager", "sdpa"))
    eager16, sdpa16 = (bench.analytic_block_saved_bytes(shape, a, True) for a in ("eager", "sdpa"))
    assert eager32 - sdpa32 == probs * 4 - lse  # the fp32 softmax output
    assert eager16 - sdpa16 == probs * (4 + 2) - lse  # and its bf16 copy for the context matmul
    with pytest.raises(ValueError, match="eager"):
        bench.analytic_block_saved_bytes(shape, "sdpa", False, CRSConfig(ratio=0.3), ("scores",))


def test_measuring_frees_the_graph():
    """The meter must not keep a graph alive: saved outputs (softmax) would otherwise leak every forward."""
    x = torch.randn(4, 100, requires_grad=True)
    alive = {}

    def forward():
        y = x.softmax(-1)  # softmax saves its own output
        alive["y"] = weakref.ref(y)
        return y.square().sum()

    saved = bench.measure_saved_bytes(forward, [], torch.device("cpu"), "fp32")
    assert saved == 4 * 100 * 4  # y, counted once (saved by softmax and by square)
    gc.collect()
    assert alive["y"]() is None


def test_max_batch_from_estimate():
    assert bench.max_batch_from_estimate(lambda b: 100 + 10 * b, 1000) == 90
    assert bench.max_batch_from_estimate(lambda b: 100 + 10 * b, 105) == 0
    assert bench.max_batch_from_estimate(lambda b: 100 + 10 * b, 110) == 1


def test_largest_fitting_search_used_by_cuda_max_batch():
    from vitcrs.bench.analytic import largest_fitting

    assert largest_fitting(lambda b: b <= 37, start=64, cap=8192) == 37  # start too big: bisect below it
    assert largest_fitting(lambda b: b <= 37, start=8, cap=8192) == 37  # doubling 8, 16, 32, then bisect
    assert largest_fitting(lambda b: b <= 37, start=0, cap=8192) == 37
    assert largest_fitting(lambda b: True, start=8, cap=100) == 64  # the largest doubling within the cap
    assert largest_fitting(lambda b: False, start=8, cap=8192) == 0


# ---------------------------------------------------------------- the command line on CPU
def _run(tmp_path, *args: str) -> tuple[dict, str]:
    assert bench.main([*TINY, *args, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    return result, (tmp_path / "bench.md").read_text()


@pytest.mark.slow
def test_cli_on_cpu_writes_one_row_per_configuration(tmp_path, capsys):
    # bf16 rows are measured by the saved-bytes tests; here the grid's rows in fp32
    result, md = _run(tmp_path, "--grid", "quick", "--ratios", "0.3", "--checkpointing", "off,on",
                      "--precision", "fp32")  # fmt: skip
    configs = expand(("wta_crs",), (0.3,), tuple(bench.BENCH_TARGET_SETS), ("eager", "sdpa"),
                     ("fp32",), (False, True))  # fmt: skip
    rows = result["rows"]
    assert [r["name"] for r in rows] == [c.name for c in configs]
    assert result["meta"]["device"].startswith("CPU") and result["meta"]["torch"] == torch.__version__
    assert "python -m vitcrs.bench --model vit_tiny" in result["meta"]["command"]
    assert md in capsys.readouterr().out  # the table is printed too

    skipped = [r for r in rows if r["status"] == "skipped"]
    assert {(r["attn"], r["targets"]) for r in skipped} == {
        ("sdpa", "study"),
        ("sdpa", "all"),
        ("sdpa", "lean_all"),
    }
    assert all("eager attention" in r["reason"] for r in skipped)
    measured = [r for r in rows if r["status"] == "ok"]
    assert len(measured) + len(skipped) == len(rows)
    for r in measured:
        assert r["saved_bytes"] > 0
        assert r.get("peak_allocated_bytes") is None and r.get("images_per_s") is None  # n/a on CPU
        if r["method"] == "exact" and not r["checkpointing"]:
            assert r["saved_reduction"] == 1.0 and r["ideal_reduction"] == 1.0
        elif not r["checkpointing"]:
            assert r["saved_reduction"] > 1.0
            assert r["realised_over_ideal"] == pytest.approx(1.0, rel=0.05)
            assert r["ideal_reduction"] > 1.0 and r["block_ideal_reduction"] > 1.0
        elif r["targets"] == "lean_block":  # not wrapped by checkpointing: it keeps only its input, modelled
            assert r["realised_over_ideal"] == pytest.approx(1.0, rel=0.05)
        else:  # checkpointing keeps only the blocks' inputs (and what is outside the blocks)
            assert r["saved_reduction"] > 1.0 and r.get("ideal_saved_bytes") is None

    table = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith(("| attn", "| ---"))]
    assert len(table) == len(measured)
    assert sum(ln.startswith("- sdpa/") for ln in md.splitlines()) == len(skipped)
    assert "| eager | fp32 | no | default | exact | 1 | - |" in md and "1.00x" in md
    assert "n/a" in md and result["meta"]["command"] in md


@pytest.mark.slow
def test_cli_on_cpu_times_steps_and_estimates_the_max_batch(tmp_path):
    result, md = _run(
        tmp_path,
        *("--attn", "eager", "--precision", "fp32", "--targets", "all", "--ratios", "0.3"),
        *("--checkpointing", "off,on", "--methods", "crs", "--time-on-cpu", "--warmup", "0", "--steps", "1"),
        *("--find-max-batch", "--memory-budget-gib", "0.25"),
    )
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == [
        "eager/fp32/exact",
        "eager/fp32/crs@0.3/all",
        "eager/fp32/exact/ckpt",
        "eager/fp32/crs@0.3/all/ckpt",
    ]
    for r in rows.values():
        assert r["status"] == "ok" and r["images_per_s"] > 0 and r["max_batch"] > 0
        assert r["throughput_ratio"] > 0
    assert rows["eager/fp32/crs@0.3/all"]["max_batch"] > rows["eager/fp32/exact"]["max_batch"]
    assert "CPU estimate" in md and "max batch @ 0.25 GiB" in md


@pytest.mark.slow
def test_cli_timing_rounds_interleave_the_configurations(tmp_path):
    """--rounds 2: each row's steps are timed twice (two rounds); the lean block under checkpointing is
    modelled (realised saved bytes = its analytic ideal)."""
    result, md = _run(
        tmp_path,
        *("--attn", "eager", "--precision", "fp32", "--targets", "lean_block", "--ratios", "0.3"),
        *("--checkpointing", "off,on", "--time-on-cpu", "--warmup", "0", "--steps", "1", "--rounds", "2"),
    )
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == [
        "eager/fp32/exact",
        "eager/fp32/wta_crs@0.3/lean_block",
        "eager/fp32/exact/ckpt",
        "eager/fp32/wta_crs@0.3/lean_block/ckpt",
    ]
    assert all(len(r["step_times_s"]) == 2 and r["images_per_s"] > 0 for r in rows.values())
    for name in ("eager/fp32/wta_crs@0.3/lean_block", "eager/fp32/wta_crs@0.3/lean_block/ckpt"):
        assert rows[name]["realised_over_ideal"] == 1.0  # the eager fp32 block model is exact to the byte
    assert result["meta"]["rounds"] == 2 and "in 2 round(s)" in md
    assert bench.main([*TINY, "--rounds", "0", "--out", str(tmp_path)]) == 2


def test_cpu_peak_bytes_counts_live_tensors_and_the_highest_net_allocation():
    kept = torch.zeros(1000)  # 4000 bytes alive through the step

    def step() -> None:
        a = torch.empty(1 << 18)  # 1 MiB
        b = torch.empty(1 << 19)  # 2 MiB, while `a` is alive: the peak
        del a, b
        c = torch.empty(1 << 18)
        del c

    assert measure.cpu_peak_bytes(step, [kept, kept[:10]]) == 4000 + 3 * 2**20  # a view counts once


@pytest.mark.slow
def test_cli_on_cpu_measures_the_peak_of_a_training_step(tmp_path):
    result, md = _run(
        tmp_path,
        *("--attn", "eager", "--precision", "fp32", "--targets", "all,lean", "--ratios", "0.3"),
        *("--methods", "wta_crs", "--cpu-peak", "--batch-size", "32", "--image-size", "128"),
    )
    rows = {r["name"]: r for r in result["rows"]}
    exact, sampled = rows["eager/fp32/exact"], rows["eager/fp32/wta_crs@0.3/all"]
    params = exact["param_bytes"]
    for r in rows.values():
        # at the end of the forward: weights, AdamW's two states, the batch and everything saved for backward;
        # at most that, the gradients, the optimizer step's temporaries and the backward's transients
        assert r["peak_allocated_bytes"] >= 3 * params + r["saved_bytes"]
        assert r["peak_allocated_bytes"] < 7 * params + 2 * r["saved_bytes"]
    assert exact["peak_allocated_reduction"] == 1.0
    assert sampled["peak_allocated_bytes"] < exact["peak_allocated_bytes"]
    assert rows["eager/fp32/wta_crs@0.3/lean"]["peak_allocated_reduction"] > 1.0
    assert result["meta"]["peak"] == "cpu" and "live CPU tensors" in md


def test_a_failing_configuration_is_reported_not_fatal(tmp_path, monkeypatch):
    real = bench.runner.run_config

    def flaky(cfg, *args):
        if cfg.method != "exact":
            raise RuntimeError("boom")
        return real(cfg, *args)

    monkeypatch.setattr(bench.runner, "run_config", flaky)
    args = ["--attn", "eager", "--precision", "fp32", "--ratios", "0.3", "--targets", "linears"]
    assert bench.main([*TINY, *args, "--out", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "error"] and rows[1]["reason"] == "RuntimeError: boom"
    assert "error: RuntimeError: boom" in (tmp_path / "bench.md").read_text()


def test_cli_rejects_bad_settings(tmp_path, capsys):
    assert bench.main([*TINY, "--find-max-batch", "--out", str(tmp_path)]) == 2
    assert "--memory-budget-gib" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main([*TINY, "--ratios", "1.5"])
    with pytest.raises(SystemExit):
        bench.main([*TINY, "--targets", "everything"])


def test_targets_are_the_catalogues_sets(capsys):
    """--targets takes any set of vitcrs.crs.TARGET_SETS, beyond the presets' BENCH_TARGET_SETS."""
    assert bench.parser().parse_args(["--targets", "qkv,study"]).targets == ("qkv", "study")
    matmuls = BenchConfig("wta_crs", 0.3, "matmuls", "eager", "fp32", False)
    assert matmuls.target_names == ("scores", "context")
    assert set(bench.BENCH_TARGET_SETS) < set(TARGET_SETS)
    with pytest.raises(SystemExit):
        bench.parser().parse_args(["--targets", "default"])  # the study's set is named "study"
    assert "study" in capsys.readouterr().err


def test_cli_refuses_an_out_file_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("vitcrs.bench.cli.run_bench", lambda *a, **k: pytest.fail("the benchmark ran"))
    (tmp_path / "results.json").write_text("mine")
    assert bench.main([*TINY, "--out", str(tmp_path / "results.json")]) == 2
    assert "is a file: give a folder" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == "mine"


def test_module_entry_point(monkeypatch, capsys):
    """`python -m vitcrs.bench --help` (its __main__, run in this process)."""
    monkeypatch.setattr(sys, "argv", ["vitcrs.bench", "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("vitcrs.bench", run_name="__main__")
    out = capsys.readouterr().out
    assert exited.value.code == 0 and "--grid" in out and "--find-max-batch" in out


@pytest.mark.slow
def test_memory_modes_are_rows_and_the_peak_is_split_into_its_parts(tmp_path):
    """--memory: keeping the lean block's input alone or its stream in bfloat16 (lean-block rows only) and
    updating inside backward (every row); --cpu-peak splits each peak into weights, optimizer state, batch,
    gradients, kept activations and transient workspace at the moment of the peak."""
    result, md = _run(
        tmp_path,
        *("--attn", "eager", "--precision", "fp32", "--targets", "lean_block", "--ratios", "0.3"),
        *("--methods", "wta_crs", "--memory", "default,keep_input,floor,bf16_stream", "--cpu-peak"),
        *("--batch-size", "16", "--image-size", "64"),
    )
    rows = {r["name"]: r for r in result["rows"]}
    lean = "eager/fp32/wta_crs@0.3/lean_block"
    modes = ["keep_input", "floor", "bf16_stream"]
    assert list(rows) == ["eager/fp32/exact", lean, *(f"{lean}/{m}" for m in modes)]
    for r in rows.values():
        parts = r["peak_breakdown"]
        assert sum(parts.values()) == r["peak_allocated_bytes"] and min(parts.values()) >= 0
        assert parts["weights"] == r["param_bytes"] and parts["optimizer_state"] == 2 * r["param_bytes"]
    # keeping the input alone halves what each lean block keeps (the analytic model says so too)
    assert rows[f"{lean}/keep_input"]["saved_bytes"] < rows[lean]["saved_bytes"]
    assert rows[f"{lean}/keep_input"]["realised_over_ideal"] == pytest.approx(1.0)
    # so does keeping x and x1 in bfloat16, less the fp32 row norms of the MLP activation
    bf16 = rows[f"{lean}/bf16_stream"]
    assert bf16["saved_bytes"] < rows[lean]["saved_bytes"]
    assert bf16["realised_over_ideal"] == pytest.approx(1.0)
    # updated inside backward, no more than one block's gradients live at once
    floor = rows[f"{lean}/floor"]
    assert floor["peak_breakdown"]["gradients"] < 0.25 * floor["param_bytes"]
    assert floor["peak_allocated_bytes"] < rows[lean]["peak_allocated_bytes"]
    assert "| memory |" in md and "transient workspace GiB" in md and "| floor |" in md
