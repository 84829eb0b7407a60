"""The GPU check kit (scripts/gpu_check.sh, tools/gpu_check): its CPU dry run end to end, and its parts."""

from __future__ import annotations

import json
import sys
import tarfile

import pytest

from conftest import CONF_DIR, REPO, compose_config, run
from gpu_check import cli
from gpu_check.plan import make_plan, override_value, train_runs
from gpu_check.steps import NOT_RUN

STEP_NAMES = ["setup", "tests", "bench_eager_fp32", "bench_sdpa_bf16", "train", "report", "fidelity"]


@pytest.mark.slow
def test_dry_run_writes_every_step_result_and_the_summary(tmp_path):
    """bash scripts/gpu_check.sh OUT --dry-run, from the repository root: every step on the CPU at tiny
    shapes (the tests step collects the device tests), all its files."""
    out, bundle = tmp_path / "out", tmp_path / "bundle"
    argv = ["bash", "scripts/gpu_check.sh", str(out), "--dry-run", "--configs", "study",
            "--work", str(tmp_path / "work"), "--bundle", str(bundle)]  # fmt: skip
    proc = run(argv, REPO, 900, PYTHON=sys.executable)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert list(status) == STEP_NAMES and set(status.values()) == {"ok"}  # the meter fits 43 images too
    tests = (out / "logs/tests.log").read_text()
    assert "--device cpu -m 'device or cuda' --collect-only" in tests
    assert "tests/test_families.py::test_every_target_set_of_every_family_is_exact_forward" in tests
    assert "tests/test_crs.py::test_crs_linear_forward_equals_torch" in tests
    for folder, attn, precision in (
        ("eager_fp32", "eager", "fp32"),
        ("sdpa_bf16-mixed", "sdpa", "bf16-mixed"),
    ):
        rows = json.loads((out / "bench" / folder / "bench.json").read_text())["rows"]
        assert {(r["attn"], r["precision"]) for r in rows} == {(attn, precision)}
        assert {r["checkpointing"] for r in rows} == {False, True}
        lean_modes = {r["memory"] for r in rows if r["targets"] == "lean_block"}
        assert lean_modes == {"default", "keep_input", "keep_input_bf16", "floor_bf16"}  # the memory floor's
        assert all(r["status"] == "ok" for r in rows) and any(r["method"] == "exact" for r in rows)
    assert (out / "bench/bench.md").read_text().count("| attn | precision |") == 2

    metrics = json.loads((out / "train/study_s0/metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["ratio"] == 0.3
    assert (out / "report/index.md").is_file() and (out / "report/accuracy.md").is_file()
    md = (out / "summary.md").read_text()
    assert (
        "| setup: payload, data extraction, device | **ok** |" in md and "| study_s0 | complete | 0.3 |" in md
    )
    assert "tests: ok" in (out / "gpu_check.log").read_text()
    assert (bundle / "summary.md").read_text() == md
    with tarfile.open(bundle / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
    assert "out/train/study_s0/metrics.json" in names and "out/tests/junit.xml" in names
    assert not [n for n in names if n.endswith(".ckpt")]  # weights stay behind


def test_a_failed_step_one_stops_the_check_with_a_summary(tmp_path, monkeypatch):
    args = cli.parser().parse_args([str(tmp_path / "out"), "--dry-run"])
    check = cli.GPUCheck(args, make_plan(True, None, 10, 1, None), ["OUT", "--dry-run"])
    monkeypatch.setattr(check, "setup", lambda: (tmp_path, tmp_path))

    def failing_tests() -> bool:
        check.finish(check.records["tests"], "failed", 1.0, "1 failed, 200 passed")
        return False

    monkeypatch.setattr(check, "tests", failing_tests)
    for later in ("bench", "train", "report", "fidelity"):
        monkeypatch.setattr(check, later, lambda *a: pytest.fail("ran after step 1 failed"))
    assert check.run(set(cli.STEPS)) == 1
    steps = {s["name"]: s for s in json.loads((tmp_path / "out/summary.json").read_text())["steps"]}
    assert steps["tests"]["status"] == "failed"
    assert all(steps[n]["status"] == NOT_RUN and "step 1" in steps[n]["note"] for n in STEP_NAMES[2:])
    assert "| tests: the test suite's device tests" in (tmp_path / "out/summary.md").read_text()


def test_a_crash_in_one_step_fails_that_step_and_the_rest_still_run(tmp_path, monkeypatch):
    args = cli.parser().parse_args([str(tmp_path / "out"), "--dry-run", "--steps", "train,report"])
    check = cli.GPUCheck(args, make_plan(True, None, 10, 1, None), ["OUT"])
    monkeypatch.setattr(check, "setup", lambda: (tmp_path, tmp_path))

    def crash(*args) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(check, "train", crash)
    monkeypatch.setattr(check, "report", lambda: check.finish(check.records["report"], "ok", 1.0))
    assert check.run({"train", "report"}) == 1
    steps = {s["name"]: s for s in json.loads((tmp_path / "out/summary.json").read_text())["steps"]}
    assert steps["train"]["status"] == "failed" and steps["train"]["note"] == "RuntimeError: boom"
    assert steps["report"]["status"] == "ok" and steps["tests"]["status"] == NOT_RUN
    assert "RuntimeError: boom" in (tmp_path / "out/gpu_check.log").read_text()  # with its traceback


def test_a_failed_fidelity_step_fails_the_check(tmp_path, monkeypatch):
    """Every step that fails shows in the exit status, the fidelity meter's included."""
    args = cli.parser().parse_args([str(tmp_path / "out"), "--dry-run", "--steps", "report,fidelity"])
    check = cli.GPUCheck(args, make_plan(True, None, 10, 1, None), ["OUT"])
    monkeypatch.setattr(check, "setup", lambda: (tmp_path, tmp_path))
    monkeypatch.setattr(check, "report", lambda: check.finish(check.records["report"], "ok", 1.0))
    monkeypatch.setattr(
        check, "fidelity", lambda *a: check.finish(check.records["fidelity"], "failed", 1.0, "exit 2")
    )
    assert check.run({"report", "fidelity"}) == 1
    assert "failed: fidelity" in (tmp_path / "out/gpu_check.log").read_text()


@pytest.mark.slow
def test_the_dry_run_fidelity_step_fits_its_payload(tmp_path):
    """The meter with the dry run's settings on the dry payload (43 training images) measures (in process:
    the step's command without the process)."""
    from gpu_check.fixtures import extract, write_dry_run_payload
    from vitcrs.fidelity.cli import run as measure

    payload = write_dry_run_payload(tmp_path / "payload")
    tree = extract(payload.archive, tmp_path / "work")
    overrides = make_plan(True, None, 10, 1, None).fidelity_overrides
    cfg = compose_config("fidelity",
        f"out_dir={tmp_path / 'out'}", "model=vit_tiny", f"model.name_or_path={payload.model}",
        "dataset=imagefolder", f"data.root={tree}", *overrides,
    )  # fmt: skip
    out = measure(cfg)
    results = json.loads((out / "fidelity.json").read_text())
    assert len(results["configurations"]) == 3 and results["exact"]["batches"] == 2


def test_training_configs_and_overrides(tmp_path):
    assert override_value(["query", "mlp"]) == "[query,mlp]"
    assert override_value(None) == "null" and override_value(0.9) == "0.9" and override_value(True) == "true"
    assert override_value({"a": 1}) == "{a:1}" and override_value("wta_crs") == "wta_crs"
    plan = make_plan(False, 2, 20000, 1, None)
    runs, _ = train_runs(plan, CONF_DIR)
    assert [r.name for r in runs][:2] == ["exact_s0", runs[1].name] and runs[-1].seed == 1
    assert {r.config for r in runs} <= {"exact", "default", "study"}
    assert all("crs.ratio=0.3" in r.crs_overrides for r in runs if r.config != "exact")
    assert (
        "trainer.accelerator=gpu" in plan.train_overrides and "data.limit_train=20000" in plan.train_overrides
    )
    assert cli.main([str(tmp_path / "x"), "--configs", "exact,bogus"]) == 2
    assert cli.main([str(tmp_path / "x"), "--seeds", "0"]) == 2
