"""vitcrs.report: tables, aggregation, grouping, bad files, plots and the CLI, on hand-written metrics."""

from __future__ import annotations

import json
import math
import runpy
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

from vitcrs.errors import ConfigError
from vitcrs.record import METRICS_KEYS, RunRecord, schema_table
from vitcrs.report import build_report, main
from vitcrs.report.data import Column, Group, config_diff, differing_keys, find_metrics, read_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SETTINGS = {
    "model": "google/vit-base-patch16-224-in21k",
    "attn_implementation": "eager",
    "precision": "32-true",
    "batch_size": 64,
    "max_epochs": 8,
    "lr": 5e-5,
    "image_size": 224,
    "method": "wta_crs",
    "targets": ["query", "key", "value", "scores", "context"],
    "prob": "norm",
    "limit_train": None,
}


def write_run(root: Path, name: str, **fields: Any) -> Path:
    """Write root/name/metrics.json: a complete GPU run on CIFAR-10 at ratio 1, seed 0, updated by `fields`
    (`settings` is merged into the default settings). Returns the run dir."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    settings = {**SETTINGS, **fields.pop("settings", {})}
    metrics = {
        "status": "complete",
        "dataset": "cifar10",
        "label_type": "fine",
        "num_classes": 10,
        "ratio": 1.0,
        "method": settings["method"],
        "targets": settings["targets"],
        "seed": 0,
        "val_acc": 0.9,
        "test_acc": 0.9,
        "peak_mem_allocated_gib": 8.0,
        "peak_mem_reserved_gib": 10.0,
        "saved_bytes_per_step": None,
        "images_per_s": 350.2,
        "epochs": 8,
        "wall_time_s": 1234.5,
        "device": "NVIDIA H100 80GB HBM3",
        "versions": {"vitcrs": "0.1.0", "torch": "2.14.1", "transformers": "5.23.0", "lightning": "2.6.6"},
        "settings": settings,
        "run_dir": str(run_dir),
        **fields,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return run_dir


# test accuracy and peak memory of the 3 datasets x 3 ratios study
STUDY = {
    ("cifar10", "fine"): {1.0: (0.9901, 8.0), 0.5: (0.9760, 4.0), 0.3: (0.9700, 3.2)},
    ("cifar100", "fine"): {1.0: (0.9210, 8.0), 0.5: (0.9100, 4.0), 0.3: (0.8850, 3.2)},
    ("cifar100_coarse", "coarse"): {1.0: (0.9350, 8.0), 0.5: (0.9300, 5.0), 0.3: (0.9200, 3.2)},
}


def write_study(root: Path) -> Path:
    """A multirun dir with the 9 runs of STUDY in numbered subdirs, plus multirun.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    n = 0
    for (dataset, label_type), cells in STUDY.items():
        for ratio, (acc, mem) in cells.items():
            write_run(
                root, str(n), dataset=dataset, label_type=label_type, ratio=ratio, test_acc=acc,
                peak_mem_allocated_gib=mem,
            )  # fmt: skip
            n += 1
    return root


def table(text: str, heading_from: int = 0) -> list[str]:
    """The lines of the first Markdown table in `text` after character `heading_from`."""
    return next(block for block in text[heading_from:].split("\n\n") if block.startswith("|")).splitlines()


def report(tmp_path: Path, *inputs: Path) -> Path:
    return build_report(list(inputs) or [tmp_path / "runs"], tmp_path / "report")


def test_accuracy_table_layout_and_drops(tmp_path: Path) -> None:
    out = report(tmp_path, write_study(tmp_path / "runs"))
    md = (out / "accuracy.md").read_text()
    assert table(md) == [
        "| Ratio | CIFAR-10 | CIFAR-100 fine | CIFAR-100 coarse |",
        "| --- | ---: | ---: | ---: |",
        "| 1 (exact) | 99.01 | 92.10 | 93.50 |",
        "| 0.5 | 97.60 (−1.41) | 91.00 (−1.10) | 93.00 (−0.50) |",
        "| 0.3 | 97.00 (−2.01) | 88.50 (−3.60) | 92.00 (−1.50) |",
    ]
    assert md.count("## Group") == 1
    assert "`method=wta_crs`" in md and "`batch_size=64`" in md
    tex = (out / "accuracy.tex").read_text()
    assert r"Ratio & CIFAR-10 & CIFAR-100 fine & CIFAR-100 coarse \\" in tex
    assert r"0.5 & 97.60 ($-$1.41) & 91.00 ($-$1.10) & 93.00 ($-$0.50) \\" in tex
    assert r"\toprule" in tex and r"batch\_size=64" in tex


def test_memory_table_reduction_factors(tmp_path: Path) -> None:
    out = report(tmp_path, write_study(tmp_path / "runs"))
    lines = table((out / "memory.md").read_text())
    assert lines[0] == "| Dataset | Ratio | Peak allocated | Peak reserved | Images/s |"
    assert lines[2] == "| CIFAR-10 | 1 (exact) | 8.00 GiB | 10.00 GiB | 350.2 |"
    assert lines[3] == "| CIFAR-10 | 0.5 | 4.00 GiB (2.00x) | 10.00 GiB (1.00x) | 350.2 |"
    assert lines[4] == "| CIFAR-10 | 0.3 | 3.20 GiB (2.50x) | 10.00 GiB (1.00x) | 350.2 |"
    assert lines[9] == "| CIFAR-100 coarse | 0.5 | 5.00 GiB (1.60x) | 10.00 GiB (1.00x) | 350.2 |"
    assert len(lines) == 2 + 9
    assert r"4.00 GiB (2.00x)" in (out / "memory.tex").read_text()


def test_seeds_give_mean_and_sample_std(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed, acc in enumerate([0.90, 0.92, 0.94]):
        write_run(runs, f"exact{seed}", seed=seed, test_acc=acc)
    for seed, acc in enumerate([0.88, 0.90]):
        write_run(runs, f"half{seed}", seed=seed, ratio=0.5, test_acc=acc, peak_mem_allocated_gib=4.0 + seed)
    out = report(tmp_path)
    std_half = statistics.stdev([88.0, 90.0])
    assert f"{std_half:.2f}" == "1.41"
    assert table((out / "accuracy.md").read_text())[2:] == [
        "| 1 (exact) | 92.00 ± 2.00, n=3 |",
        "| 0.5 | 89.00 ± 1.41 (−3.00), n=2 |",
    ]
    assert "| CIFAR-10 | 0.5 | 4.50 GiB (1.78x) |" in (out / "memory.md").read_text()
    cells = json.loads((out / "results.json").read_text())["groups"][0]["cells"]
    exact, half = (next(c for c in cells if c["ratio"] == r) for r in (1.0, 0.5))
    assert exact["test_acc"]["mean"] == pytest.approx(0.92)
    assert exact["test_acc"]["std"] == pytest.approx(0.02)
    assert exact["seeds"] == [0, 1, 2] and half["test_acc"]["n"] == 2
    assert half["test_acc_change_pts"] == pytest.approx(-3.0)
    assert half["reduction"]["peak_mem_allocated_gib"] == pytest.approx(8.0 / 4.5)


def test_same_seed_count_everywhere_is_stated_once(tmp_path: Path) -> None:
    for seed in range(2):
        write_run(tmp_path / "runs", f"a{seed}", seed=seed, test_acc=0.9 + seed / 100)
        write_run(tmp_path / "runs", f"b{seed}", seed=seed, ratio=0.5, test_acc=0.88)
    md = (report(tmp_path) / "accuracy.md").read_text()
    assert table(md)[2:] == ["| 1 (exact) | 90.50 ± 0.71 |", "| 0.5 | 88.00 ± 0.00 (−2.50) |"]
    assert "n=2 complete runs" in md


def test_missing_cells_show_a_dash(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "a", dataset="cifar10", ratio=1.0, test_acc=0.99)
    write_run(runs, "b", dataset="cifar10", ratio=0.5, test_acc=0.98)
    write_run(runs, "c", dataset="cifar100", ratio=0.5, test_acc=0.90)
    out = report(tmp_path)
    assert table((out / "accuracy.md").read_text())[2:] == [
        "| 1 (exact) | 99.00 | — |",
        "| 0.5 | 98.00 (−1.00) | 90.00 |",
    ]
    assert "| CIFAR-100 fine | 1 (exact) | — | — | — |" in (out / "memory.md").read_text()
    assert r"1 (exact) & 99.00 & -- \\" in (out / "accuracy.tex").read_text()


def test_failed_and_incomplete_runs_are_shown_and_listed(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "exact", test_acc=0.99)
    failed = write_run(runs, "oom", ratio=0.5, status="failed", error="CUDA out of\nmemory", test_acc=None)
    write_run(runs, "killed", ratio=0.3, status="incomplete", test_acc=None, peak_mem_allocated_gib=None)
    write_run(runs, "half_ok", ratio=0.5, seed=1, test_acc=0.97)
    out = report(tmp_path)
    md = (out / "accuracy.md").read_text()
    assert table(md)[2:] == [
        "| 1 (exact) | 99.00 |",
        "| 0.5 | 97.00 (−2.00); 1 failed |",
        "| 0.3 | incomplete |",
    ]
    assert f"- CIFAR-10, ratio 0.5, seed 0: **failed**: CUDA out of memory — `{failed}`" in md
    assert "- CIFAR-10, ratio 0.3, seed 0: **incomplete**" in md
    assert "| CIFAR-10 | 0.3 | incomplete | incomplete | incomplete |" in (out / "memory.md").read_text()
    assert "CUDA out of memory" in (out / "accuracy.tex").read_text()
    unfinished = json.loads((out / "results.json").read_text())["groups"][0]["unfinished"]
    assert {u["status"] for u in unfinished} == {"failed", "incomplete"}


def test_only_failed_cell_says_failed(tmp_path: Path) -> None:
    write_run(tmp_path / "runs", "a", ratio=1.0, status="failed", error="boom", test_acc=None)
    write_run(tmp_path / "runs", "b", ratio=0.5, test_acc=0.9)
    md = (report(tmp_path) / "accuracy.md").read_text()
    assert table(md)[2:] == ["| 1 (exact) | failed |", "| 0.5 | 90.00 |"]  # no drop without a reference


def test_status_words_are_escaped_in_latex(tmp_path: Path) -> None:
    write_run(tmp_path / "runs", "a", ratio=1.0, test_acc=0.9)
    write_run(tmp_path / "runs", "b", ratio=0.5, test_acc=None)  # complete, but no test accuracy
    write_run(tmp_path / "runs", "c", ratio=0.3, test_acc=0.8)
    write_run(tmp_path / "runs", "d", ratio=0.3, seed=1, test_acc=None)
    out = report(tmp_path)
    assert table((out / "accuracy.md").read_text())[3:] == [
        "| 0.5 | no test_acc |",
        "| 0.3 | 80.00 (−10.00); 1 no test_acc |",
    ]
    tex = (out / "accuracy.tex").read_text()
    assert r"0.5 & no test\_acc \\" in tex
    assert r"0.3 & 80.00 ($-$10.00); 1 no test\_acc \\" in tex
    table_lines = [ln for ln in tex.splitlines() if not ln.startswith("%")]  # comments need no escaping
    assert not any("test_acc" in ln for ln in table_lines)


def test_bad_files_are_listed_not_fatal(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "good", test_acc=0.95)
    bad = {"truncated": '{"status": "com', "empty": "", "list": "[1, 2]", "noratio": '{"dataset": "cifar10"}'}
    for name, text in bad.items():
        (runs / name).mkdir()
        (runs / name / "metrics.json").write_text(text)
    write_run(runs, "percent", test_acc=95.0)
    out = report(tmp_path)
    md = (out / "accuracy.md").read_text()
    assert table(md)[2:] == ["| 1 (exact) | 95.00 |"]
    problems = md.split("## Unreadable or invalid metrics files")[1]
    for name in [*bad, "percent"]:
        assert f"`{runs / name / 'metrics.json'}`" in problems
    assert "unreadable: JSONDecodeError" in problems and "not a JSON object" in problems
    assert "no usable ratio" in problems and "test_acc 95.0 is not a fraction" in problems
    assert len(json.loads((out / "results.json").read_text())["unreadable"]) == 5


def test_partial_fields_do_not_crash(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"dataset": "synthetic", "ratio": 0.3, "test_acc": "high", "seed": "x"}))
    run = read_run(path)
    assert not hasattr(run, "reason")
    assert (run.status, run.test_acc, run.seed, run.config) == ("incomplete", None, None, {})
    out = build_report([path], tmp_path / "out")
    assert "| 0.3 | incomplete |" in (out / "accuracy.md").read_text()


def test_different_settings_land_in_different_sections(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "wta", test_acc=0.99)
    write_run(runs, "wta_half", ratio=0.5, test_acc=0.98)
    write_run(runs, "crs", test_acc=0.97, settings={"method": "crs"})
    write_run(runs, "crs_half", ratio=0.5, test_acc=0.90, settings={"method": "crs"})
    md = (report(tmp_path) / "accuracy.md").read_text()
    assert "2 groups whose settings differ in: method" in md
    crs, wta = md.index("## Group 1 of 2: method=crs"), md.index("## Group 2 of 2: method=wta_crs")
    assert table(md, wta)[2:] == ["| 1 (exact) | 99.00 |", "| 0.5 | 98.00 (−1.00) |"]
    assert table(md, crs)[2:] == ["| 1 (exact) | 97.00 |", "| 0.5 | 90.00 (−7.00) |"]


@pytest.mark.slow
def test_device_and_versions_split_groups_too(tmp_path: Path) -> None:
    write_run(tmp_path / "runs", "a")
    write_run(tmp_path / "runs", "b", device="NVIDIA H200")
    write_run(tmp_path / "runs", "c", versions={"torch": "2.13.0"})
    md = (report(tmp_path) / "accuracy.md").read_text()
    assert md.count("## Group") == 3
    assert "differ in: device, versions.vitcrs, versions.torch" in md


def test_cpu_runs_show_saved_bytes(tmp_path: Path) -> None:
    cpu = {"device": "cpu", "peak_mem_allocated_gib": None, "peak_mem_reserved_gib": None}
    write_run(tmp_path / "runs", "exact", saved_bytes_per_step=512 * 2**20, **cpu)
    write_run(tmp_path / "runs", "half", ratio=0.5, saved_bytes_per_step=128 * 2**20, **cpu)
    write_run(tmp_path / "runs", "big", dataset="synthetic", saved_bytes_per_step=3 * 2**30, **cpu)
    out = report(tmp_path)
    lines = table((out / "memory.md").read_text())
    assert lines[0] == "| Dataset | Ratio | Saved for backward / step | Images/s |"
    assert lines[2:] == [
        "| CIFAR-10 | 1 (exact) | 512.00 MiB | 350.2 |",
        "| CIFAR-10 | 0.5 | 128.00 MiB (4.00x) | 350.2 |",
        "| synthetic | 1 (exact) | 3.00 GiB | 350.2 |",
        "| synthetic | 0.5 | — | — |",
    ]
    assert (out / "memory_vs_ratio.png").stat().st_size > 0


def test_differing_keys_and_config_diff_agree() -> None:
    a = {"method": "crs", "opt": {"lr": 1, "wd": 0}}
    b = {"method": "wta_crs", "opt": {"wd": 0, "lr": 1}}  # same dict value, other key order
    c = {"method": "crs", "opt": {"lr": 1, "wd": 0}, "extra": None}  # null differs from missing
    groups = [Group(i, config, []) for i, config in enumerate((a, b, c), 1)]
    assert config_diff(a, b) == ("method",) and config_diff(a, c) == ("extra",)
    assert differing_keys(groups) == ["method", "extra"]


def test_column_labels() -> None:
    assert Column("cifar10", "fine").label == "CIFAR-10"
    assert Column("cifar100", "fine").label == "CIFAR-100 fine"
    assert Column("cifar100", "coarse").label == "CIFAR-100 coarse"
    assert Column("my_flowers", "fine").label == "my_flowers"
    order = sorted([Column("aaa", "fine"), Column("cifar100", "coarse"), Column("cifar10", "fine")],
                   key=lambda c: c.sort_key)  # fmt: skip
    assert [c.label for c in order] == ["CIFAR-10", "CIFAR-100 coarse", "aaa"]


def test_cifar100_coarse_name_and_label_type_share_a_column(tmp_path: Path) -> None:
    write_run(tmp_path / "runs", "a", dataset="cifar100_coarse", label_type="coarse", test_acc=0.9)
    write_run(tmp_path / "runs", "b", dataset="cifar100", label_type="coarse", seed=1, test_acc=0.8)
    assert table((report(tmp_path) / "accuracy.md").read_text()) == [
        "| Ratio | CIFAR-100 coarse |",
        "| --- | ---: |",
        "| 1 (exact) | 85.00 ± 7.07 |",
    ]


def test_pngs_are_valid(tmp_path: Path) -> None:
    out = report(tmp_path, write_study(tmp_path / "runs"))
    for name in ("accuracy_vs_ratio.png", "memory_vs_ratio.png", "accuracy_vs_memory.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", name
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 100 and height > 100 and len(data) > 5000, name


def test_results_json_and_index(tmp_path: Path) -> None:
    runs = write_study(tmp_path / "runs")
    out = build_report([runs / "0", runs], tmp_path / "report", command="python -m vitcrs.report X")
    data = json.loads((out / "results.json").read_text())
    (group,) = data["groups"]
    assert len(group["cells"]) == 9  # run 0 is given twice but counted once
    cell = next(c for c in group["cells"] if c["column"] == "CIFAR-100 fine" and c["ratio"] == 0.3)
    assert math.isclose(cell["test_acc_change_pts"], -3.6)
    assert cell["reduction"]["peak_mem_allocated_gib"] == pytest.approx(2.5)
    assert group["settings"]["method"] == "wta_crs" and group["settings"]["device"] == "NVIDIA H100 80GB HBM3"
    index = (out / "index.md").read_text()
    for name in (
        "accuracy.md",
        "accuracy.tex",
        "memory.md",
        "memory.tex",
        "results.json",
        "memory_vs_ratio.png",
    ):
        assert f"[{name}]({name})" in index
    assert f"`{runs / '0'}`: 1 metrics.json" in index and f"`{runs}`: 9 metrics.json" in index
    assert "python -m vitcrs.report X" in index and "Runs: 9 (9 complete)" in index


def test_missing_path_or_no_metrics_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="not found"):
        build_report([tmp_path / "nope"], tmp_path / "out")
    with pytest.raises(ConfigError, match=r"no metrics\.json"):
        build_report([tmp_path], tmp_path / "out")
    assert main([str(tmp_path / "nope")]) == 2
    assert "error: paths:" in capsys.readouterr().err


def _report_command(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """Exit status and stdout of `python -m vitcrs.report *argv` (its __main__, run in this process)."""
    monkeypatch.setattr(sys, "argv", ["vitcrs.report", *argv])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("vitcrs.report", run_name="__main__")
    return exited.value.code, capsys.readouterr().out


def test_cli_prints_the_report_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    runs = write_study(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    code, stdout = _report_command([str(runs)], monkeypatch, capsys)
    assert code == 0
    out = Path(stdout.strip())
    assert out.parent == tmp_path / "reports" and out.is_dir()
    assert (out / "accuracy.md").read_text().count("(−") == 6
    assert f"python -m vitcrs.report {runs}" in (out / "index.md").read_text()
    explicit = tmp_path / "explicit"
    code, stdout = _report_command([str(runs), "--out", str(explicit)], monkeypatch, capsys)
    assert code == 0 and stdout == f"{explicit}\n"
    assert {p.name for p in explicit.iterdir()} >= {"accuracy.md", "memory.tex", "accuracy_vs_memory.png"}


def test_readme_metrics_table_is_generated_from_the_record(capsys: pytest.CaptureFixture[str]) -> None:
    """README's metrics.json table is `python -m vitcrs.report --schema`: one row per RunRecord field."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("| key | meaning |\n")
    assert readme[start : readme.index("\n\n", start) + 1] == schema_table()
    assert main(["--schema"]) == 0 and capsys.readouterr().out == schema_table()
    rows = schema_table().splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == [*METRICS_KEYS, "error"]
    assert all(row.split(" | ")[1].strip(" |") for row in rows)  # every key has its meaning
    with pytest.raises(SystemExit):
        main([])  # neither paths nor --schema


def test_record_round_trip_and_files_of_older_versions(tmp_path: Path) -> None:
    record = RunRecord(status="complete", dataset="cifar10", ratio=0.5, settings={"method": "crs"})
    data = record.to_json()
    assert list(data) == list(METRICS_KEYS) and data["epochs"] == 0  # error only once set
    assert RunRecord.from_json(data) == record
    failed = RunRecord(status="failed", error="ValueError: x").to_json()
    assert list(failed) == [*METRICS_KEYS, "error"]
    # an older file: no sample_cache or fidelity keys, and a key this version no longer writes
    old = {k: v for k, v in data.items() if k not in ("sample_cache", "fidelity_rel_err", "fidelity_cos")}
    assert RunRecord.from_json({**old, "retired_key": 1}) == record
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(old), encoding="utf-8")
    assert RunRecord.read(path) == record and RunRecord.read(tmp_path / "missing.json") is None
    path.write_text("[1]", encoding="utf-8")
    assert RunRecord.read(path) is None
    # the records kept in docs/results, written by earlier versions, read as complete runs
    kept = find_metrics(Path(__file__).resolve().parents[1] / "docs" / "results")
    assert kept and all(getattr(read_run(p), "status", None) == "complete" for p in kept)


def test_report_of_only_unreadable_files_is_still_written(tmp_path: Path) -> None:
    (tmp_path / "runs" / "0").mkdir(parents=True)
    (tmp_path / "runs" / "0" / "metrics.json").write_bytes(b"\xff\xfe garbage")
    out = report(tmp_path)
    md = (out / "accuracy.md").read_text()
    assert "No usable runs." in md and "unreadable: UnicodeDecodeError" in md
    assert (out / "accuracy_vs_ratio.png").read_bytes()[:8] == PNG_SIGNATURE


def test_each_skipped_file_is_named_with_its_reason(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path / "runs", "good")
    broken, keyless = tmp_path / "runs" / "broken", tmp_path / "runs" / "keyless"
    broken.mkdir()
    (broken / "metrics.json").write_text('{"status": "compl')
    keyless.mkdir()
    (keyless / "metrics.json").write_text(json.dumps({"status": "complete", "dataset": "cifar10"}))
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    assert f"skipped {broken / 'metrics.json'}: unreadable: JSONDecodeError" in err
    assert f"skipped {keyless / 'metrics.json'}: no usable ratio (None)" in err
    assert "good" not in err


def test_out_that_is_a_file_is_refused_before_anything_is_read(tmp_path: Path, capsys) -> None:
    write_run(tmp_path / "runs", "good")
    (tmp_path / "report.md").write_text("mine")
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "report.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out={str(tmp_path / 'report.md')!r} is a file: give a folder")
    assert (tmp_path / "report.md").read_text() == "mine"


# targets_ablation-like runs: an exact run ignores method/targets/prob, so one is the baseline of all
QKV = ["query", "key", "value"]
STUDY_TARGETS = SETTINGS["targets"]
LINEARS = ["query", "key", "value", "attn_output", "fc1", "fc2"]
LEAN = ["query", "key", "value", "attn_output", "mlp", "scores", "context"]
# (targets, method) -> ratio -> (test_acc, peak allocated GiB); the only exact run (qkv, wta_crs) comes last
ABLATION = {
    (tuple(QKV), "crs"): {0.5: (0.97, 6.0), 0.3: (0.95, 5.0)},
    (tuple(QKV), "wta_crs"): {0.5: (0.98, 6.0), 0.3: (0.96, 5.0)},
    (tuple(STUDY_TARGETS), "crs"): {0.5: (0.96, 4.0), 0.3: (0.94, 3.2)},
    (tuple(STUDY_TARGETS), "wta_crs"): {0.5: (0.97, 4.0), 0.3: (0.95, 3.2)},
}


def write_ablation(root: Path) -> Path:
    """Groups 1-4 in ABLATION's order; only group 2 (qkv, wta_crs) has a ratio-1 run (99.00 %, 8 GiB)."""
    n = 0
    for (targets, method), cells in ABLATION.items():
        for ratio, (acc, mem) in cells.items():
            settings = {"targets": list(targets), "method": method}
            write_run(root, str(n), ratio=ratio, test_acc=acc, peak_mem_allocated_gib=mem, settings=settings)
            n += 1
    write_run(root, str(n), test_acc=0.99, settings={"targets": QKV, "method": "wta_crs"})
    return root


def section(md: str, index: int) -> str:
    """The text of the section "## Group <index> of …" up to the next section."""
    start = md.index(f"## Group {index} of ")
    end = md.find("\n## ", start + 1)
    return md[start : None if end < 0 else end]


@pytest.mark.slow
def test_ablation_groups_share_one_exact_baseline(tmp_path: Path) -> None:
    out = report(tmp_path, write_ablation(tmp_path / "runs"))
    md = (out / "accuracy.md").read_text()
    assert md.count("## Group") == 4
    assert "## Group 2 of 4: method=wta_crs, targets=query,key,value" in md
    # group 2 owns the exact run: unchanged table, no note
    assert table(section(md, 2))[2:] == [
        "| 1 (exact) | 99.00 |",
        "| 0.5 | 98.00 (−1.00) |",
        "| 0.3 | 96.00 (−3.00) |",
    ]
    assert "Note:" not in section(md, 2)
    expected = {
        1: (["| 0.5 | 97.00 (−2.00) |", "| 0.3 | 95.00 (−4.00) |"], "method"),
        3: (["| 0.5 | 96.00 (−3.00) |", "| 0.3 | 94.00 (−5.00) |"], "method/targets"),
        4: (["| 0.5 | 97.00 (−2.00) |", "| 0.3 | 95.00 (−4.00) |"], "targets"),
    }
    memory = (out / "memory.md").read_text()
    for index, (rows, differs) in expected.items():
        text = section(md, index)
        assert table(text)[2:] == ["| 1 (exact, shared) | 99.00 |", *rows], index
        assert f"Note: Exact baseline shared from group 2 (differs only in {differs}) for CIFAR-10:" in text
        assert f"shared from group 2 (differs only in {differs})" in section(memory, index)
        assert (
            table(section(memory, index))[2]
            == "| CIFAR-10 | 1 (exact, shared) | 8.00 GiB | 10.00 GiB | 350.2 |"
        )
    assert table(section(memory, 1))[3] == "| CIFAR-10 | 0.5 | 6.00 GiB (1.33x) | 10.00 GiB (1.00x) | 350.2 |"
    assert table(section(memory, 4))[4] == "| CIFAR-10 | 0.3 | 3.20 GiB (2.50x) | 10.00 GiB (1.00x) | 350.2 |"
    tex = (out / "accuracy.tex").read_text()
    assert r"1 (exact, shared) & 99.00 \\" in tex and r"0.3 & 94.00 ($-$5.00) \\" in tex
    assert "Exact baseline shared from group 2 (differs only in method/targets) for CIFAR-10" in tex
    assert r"4.00 GiB (2.00x)" in (out / "memory.tex").read_text()
    groups = json.loads((out / "results.json").read_text())["groups"]
    assert groups[1]["shared_exact"] == []
    (shared,) = groups[2]["shared_exact"]
    assert (shared["column"], shared["from_group"], shared["differs"]) == (
        "CIFAR-10",
        2,
        ["method", "targets"],
    )
    assert shared["cell"]["test_acc"]["mean"] == pytest.approx(0.99)
    assert [c["ratio"] for c in groups[2]["cells"]] == [0.5, 0.3]  # a borrowed cell is not the group's own
    half = groups[2]["cells"][0]
    assert half["test_acc_change_pts"] == pytest.approx(-3.0)
    assert half["reduction"]["peak_mem_allocated_gib"] == pytest.approx(2.0)


def test_runs_that_keep_or_split_otherwise_are_grouped_apart_and_share_the_exact_run(tmp_path: Path) -> None:
    """crs.budget and crs.keep_dtype change the gradients (crs.keep_mid the memory): their runs are not
    averaged together, and each group compares with the one exact run (which ignores all three)."""
    runs = tmp_path / "runs"
    write_run(runs, "exact", test_acc=0.90)
    lean = {"targets": ["lean_block"], "budget": "uniform", "keep_mid": True, "keep_dtype": None}
    variants = {
        "uniform": {},
        "split": {"budget": "split"},
        "bf16": {"keep_mid": False, "keep_dtype": "bfloat16"},
    }
    for i, (name, change) in enumerate(variants.items()):
        write_run(runs, name, ratio=0.3, test_acc=0.89 - i / 100, settings={**lean, **change})
    md = (report(tmp_path, runs) / "accuracy.md").read_text()
    assert md.count("## Group") == 4
    titles = [line for line in md.splitlines() if line.startswith("## Group")]  # runs in name order
    assert titles[0].endswith("targets=lean_block, budget=uniform, keep_mid=false, keep_dtype=bfloat16")
    assert titles[2].endswith("targets=lean_block, budget=split, keep_mid=true, keep_dtype=null")
    cells = {1: ("87.00 (−3.00)", "targets/keep_mid/keep_dtype"), 3: ("88.00 (−2.00)", "targets/budget")}
    for index, (acc, differs) in {**cells, 4: ("89.00 (−1.00)", "targets")}.items():
        assert table(section(md, index))[2:] == ["| 1 (exact, shared) | 90.00 |", f"| 0.3 | {acc} |"]
        assert f"whatever {differs} say" in section(md, index)  # the exact run predates them: defaults


@pytest.mark.slow
def test_mlp_groups_neither_borrow_nor_lend_an_exact_baseline(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "0", test_acc=0.99, settings={"targets": QKV})  # group 1: the only usable CIFAR-10 exact
    write_run(runs, "1", ratio=0.5, test_acc=0.97, peak_mem_allocated_gib=4.0, settings={"targets": LEAN})
    lean_exact = {"dataset": "cifar100", "test_acc": 0.92, "settings": {"targets": LEAN, "method": "crs"}}
    write_run(runs, "2", **lean_exact)  # group 3: a lean exact run must not be lent
    for n, dataset in ((3, "cifar10"), (4, "cifar100")):
        write_run(runs, str(n), dataset=dataset, ratio=0.5, test_acc=0.91 + (dataset == "cifar10") * 0.06,
                  peak_mem_allocated_gib=4.0, settings={"targets": QKV, "method": "crs"})  # fmt: skip
    out = report(tmp_path)
    md = (out / "accuracy.md").read_text()
    assert md.count("## Group") == 4
    lean = section(md, 2)
    assert "targets=query,key,value,attn_output,mlp,scores,context" in lean
    assert table(lean)[2:] == ["| 0.5 | 97.00 |"]  # no exact row, no change
    assert "Exact baseline shared" not in lean
    assert "No exact baseline for CIFAR-10: none is shared into a group whose targets contain mlp" in lean
    qkv_crs = section(md, 4)
    assert table(qkv_crs)[2:] == ["| 1 (exact, shared) | 99.00 | — |", "| 0.5 | 97.00 (−2.00) | 91.00 |"]
    assert "shared from group 1 (differs only in method) for CIFAR-10:" in qkv_crs
    memory = section((out / "memory.md").read_text(), 4)
    assert "| CIFAR-100 fine | 1 (exact) | — | — | — |" in memory
    assert "| CIFAR-100 fine | 0.5 | 4.00 GiB | 10.00 GiB | 350.2 |" in memory
    groups = json.loads((out / "results.json").read_text())["groups"]
    assert groups[1]["shared_exact"] == [] and groups[2]["shared_exact"] == []
    assert groups[1]["cells"][0]["test_acc_change_pts"] is None
    assert groups[1]["cells"][0]["reduction"]["peak_mem_allocated_gib"] is None
    assert [s["column"] for s in groups[3]["shared_exact"]] == ["CIFAR-10"]


@pytest.mark.slow
def test_no_sharing_across_attention_or_other_settings(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "0", test_acc=0.99, settings={"targets": LINEARS})  # eager, batch 64: the only exact
    write_run(
        runs, "1", ratio=0.5, test_acc=0.97, settings={"targets": LINEARS, "attn_implementation": "sdpa"}
    )
    write_run(runs, "2", ratio=0.5, test_acc=0.96, settings={"targets": LINEARS, "batch_size": 32})
    write_run(runs, "3", ratio=0.5, test_acc=0.95, settings={"targets": LINEARS, "precision": "bf16-mixed"})
    write_run(runs, "4", ratio=0.5, test_acc=0.98, settings={"targets": LINEARS, "method": "crs"})
    md = (report(tmp_path) / "accuracy.md").read_text()
    for index, acc in ((2, "97.00"), (3, "96.00"), (4, "95.00")):
        assert table(section(md, index))[2:] == [f"| 0.5 | {acc} |"], index
        assert "Note:" not in section(md, index)
    assert table(section(md, 5))[2:] == ["| 1 (exact, shared) | 99.00 |", "| 0.5 | 98.00 (−1.00) |"]


@pytest.mark.slow
def test_shared_baseline_prefers_identical_targets_then_fewest_differences(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "0", test_acc=0.90, settings={"targets": LINEARS, "method": "crs"})  # group 1
    write_run(runs, "1", test_acc=0.99, settings={"targets": QKV})  # group 2: qkv, wta_crs
    write_run(runs, "2", ratio=0.5, test_acc=0.89, settings={"targets": QKV, "method": "crs"})  # group 3
    write_run(runs, "3", ratio=0.5, test_acc=0.88, settings={"method": "crs"})  # group 4: study targets
    write_run(runs, "4", ratio=1.0, status="failed", test_acc=None, settings={"prob": "uniform"})  # group 5
    write_run(runs, "5", ratio=0.5, test_acc=0.95)  # group 6: study targets, wta_crs, prob norm
    md = (report(tmp_path) / "accuracy.md").read_text()
    # identical targets (group 2) wins over a lower group index with as few differences (group 1)
    assert "shared from group 2 (differs only in method) for CIFAR-10" in section(md, 3)
    assert table(section(md, 3))[3] == "| 0.5 | 89.00 (−10.00) |"
    # no identical targets: group 1 (targets differ) over group 2 (method and targets differ)
    assert "shared from group 1 (differs only in targets) for CIFAR-10" in section(md, 4)
    assert table(section(md, 4))[3] == "| 0.5 | 88.00 (−2.00) |"
    # group 5's exact run failed, so it lends nothing; group 2 differs in targets only
    assert "shared from group 2 (differs only in targets) for CIFAR-10" in section(md, 6)
    assert table(section(md, 5))[2:] == ["| 1 (exact) | failed |"]


def test_gradient_fidelity_columns_only_when_measured(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "exact", fidelity_rel_err=0.0, fidelity_cos=1.0)
    write_run(runs, "half", ratio=0.5, fidelity_rel_err=0.0123, fidelity_cos=0.9876)
    write_run(runs, "other", settings={"lr": 1e-4})  # no fidelity measured: no columns in its group
    out = report(tmp_path, runs)
    md = (out / "memory.md").read_text()
    measured = table(md)
    assert measured[0].endswith("| Images/s | Grad. rel. error | Grad. cos |")
    assert measured[3] == "| CIFAR-10 | 0.5 | 8.00 GiB (1.00x) | 10.00 GiB (1.00x) | 350.2 | 0.0123 | 0.988 |"
    assert table(md, md.index("## Group 2"))[0].endswith("| Images/s |")
    cell = json.loads((out / "results.json").read_text())["groups"][0]["cells"][1]
    assert cell["fidelity_rel_err"]["mean"] == pytest.approx(0.0123)
