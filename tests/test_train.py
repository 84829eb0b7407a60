"""vitcrs.train end to end on the synthetic demo (CPU, a few batches), and the run record it keeps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from conftest import QUICK
from support.faults import FAULT
from vitcrs.callbacks import MetricsFile, PeakMemoryMonitor
from vitcrs.errors import ConfigError
from vitcrs.files import write_json_atomic
from vitcrs.models import ViTClassifier
from vitcrs.record import METRICS_KEYS, RunRecord
from vitcrs.train import train
from vitcrs.trainer import quiet_known_warnings

pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec:FutureWarning")

SETTINGS_KEYS = {
    "model", "attn_implementation", "precision", "batch_size", "max_epochs", "lr", "image_size", "method",
    "targets", "prob", "budget", "keep_mid", "keep_dtype", "limit_train",
}  # fmt: skip


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_complete_record(run_dir: Path, ratio: float) -> dict:
    """metrics.json of a finished CPU run: exactly the documented keys, each of its type."""
    m = json.loads((run_dir / "metrics.json").read_text())
    assert set(m) == set(METRICS_KEYS)
    assert m["status"] == "complete"
    assert m["dataset"] == "synthetic" and m["label_type"] == "fine" and m["num_classes"] == 10
    assert m["ratio"] == ratio and m["method"] == "wta_crs" and m["seed"] == 0
    assert m["targets"] == ["query", "key", "value", "scores", "context"]
    for key in ("val_acc", "test_acc"):
        assert _is_num(m[key]) and 0.0 <= m[key] <= 1.0, key
    assert m["peak_mem_allocated_gib"] is None and m["peak_mem_reserved_gib"] is None  # CPU: not measured
    assert isinstance(m["saved_bytes_per_step"], int) and m["saved_bytes_per_step"] > 0
    # the exact baseline, measured side by side on the same batch: CRS below 1 keeps less; at ratio 1 the
    # two agree up to a scalar the training step's bookkeeping keeps beside the model's activations
    exact, saved = m["saved_bytes_per_step_exact"], m["saved_bytes_per_step"]
    assert isinstance(exact, int) and (exact > 1.05 * saved if ratio < 1 else abs(exact - saved) <= 16)
    assert _is_num(m["images_per_s"]) and m["images_per_s"] > 0
    assert m["epochs"] == 1 and _is_num(m["wall_time_s"]) and m["wall_time_s"] > 0
    assert m["device"] == "cpu"
    assert set(m["versions"]) == {"vitcrs", "torch", "transformers", "lightning"}
    assert all(isinstance(v, str) for v in m["versions"].values())
    assert set(m["settings"]) == SETTINGS_KEYS
    s = m["settings"]
    assert s["model"] == "vit_micro" and s["precision"] == "32-true" and s["image_size"] == 32
    assert s["batch_size"] == 64 and s["max_epochs"] == 1 and s["prob"] == "norm" and s["limit_train"] is None
    assert Path(m["run_dir"]) == run_dir.resolve()
    return m


def test_demo_run_writes_every_output(run_train, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(*QUICK, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    m = check_complete_record(run_dir, 0.3)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    # the closing lines print the memory figures beside the exact baseline
    saved, exact = m["saved_bytes_per_step"] / 2**20, m["saved_bytes_per_step_exact"] / 2**20
    assert f"saved for backward {saved:.1f} MiB/step (exact: {exact:.1f} MiB" in proc.stdout + proc.stderr
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    logged = {"train/loss_epoch", "val/acc", "test/acc", "mem/saved_mib_per_step", "perf/images_per_s"}
    logged |= {"mem/saved_mib_per_step_exact"}
    assert logged <= set(header)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run_dir / "checkpoints").glob("best-*.ckpt"))) == 1
    # No warning spam: Python warnings print as "<file>.py:<line>: <message>".
    assert not re.findall(r"\.py:\d+: .*", proc.stderr), proc.stderr[-3000:]


def test_multirun_writes_one_run_dir_per_job(ratio_sweep):
    """`-m ... crs.ratio=1.0,0.3` (conftest.ratio_sweep): a run dir per job, each with its whole record."""
    check_complete_record(ratio_sweep / "0", 1.0)
    check_complete_record(ratio_sweep / "1", 0.3)
    assert (ratio_sweep / "multirun.yaml").is_file()


def test_bad_setting_exits_with_a_clean_message(run_train, tmp_path):
    """The command line itself (a process of its own): exit status 2 and the message, no traceback."""
    proc = run_train(
        "experiment=demo",
        "crs.ratio=0",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        check=False,
        process=True,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "crs.ratio=0 is invalid" in out and "Traceback" not in out
    assert not (tmp_path / "run" / "metrics.json").exists()


# --- in process: failure, resume, validation ------------------------------------------------------------


def test_bad_setting_fails_before_writing_anything(compose_cfg, tmp_path):
    cfg = compose_cfg(*QUICK, "crs.ratio=2")
    with pytest.raises(ConfigError, match=r"crs\.ratio"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_failed_run_is_marked_failed(compose_cfg, tmp_path, monkeypatch):
    real = ViTClassifier.loss

    def nan_loss(self, batch):
        loss, logits, y = real(self, batch)
        return loss * float("nan"), logits, y

    monkeypatch.setattr(ViTClassifier, "loss", nan_loss)
    cfg = compose_cfg(*QUICK, "callbacks.progress_bar=null", "trainer.num_sanity_val_steps=0")
    with pytest.raises(FloatingPointError):
        train(cfg)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "failed" and m["error"].startswith("FloatingPointError: training loss became nan")
    assert m["test_acc"] is None


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_resume_continues_the_run(compose_cfg, tmp_path):
    first = compose_cfg(*QUICK, "callbacks.progress_bar=null", "crs.prob=norm_grad")
    train(first)
    before = json.loads((tmp_path / "run" / "metrics.json").read_text())
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["crs"][0]["grad_norm"] and saved["crs"][0]["generator"]["seed"] == 0

    # Resumed in place (as with hydra.run.dir=<the run dir>), so checkpoint selection spans both segments.
    second = compose_cfg(*QUICK, "callbacks.progress_bar=null", "crs.prob=norm_grad", "trainer.max_epochs=2",
                         f"ckpt_path={last}")  # fmt: skip
    train(second)
    after = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert after["status"] == "complete" and after["epochs"] == 2
    assert after["val_acc"] >= before["val_acc"]  # the best of both segments
    assert after["wall_time_s"] > before["wall_time_s"] * 0.5
    # the complete record of the first segment is kept beside the new one (not lost by training on)
    assert json.loads((tmp_path / "run" / "metrics.segment-1.json").read_text()) == before
    csv = tmp_path / "run" / "csv"
    # both segments' logs are kept
    assert (csv / "metrics.csv").is_file() and (csv / "metrics.segment-1.csv").is_file()


def test_quieting_twice_adds_no_second_log_filter():
    import logging

    quiet_known_warnings()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    before = list(logger.filters)
    quiet_known_warnings()  # each job of an in-process sweep calls it again
    assert logger.filters == before


def test_resumed_csv_logs_never_overwrite_a_kept_segment(tmp_path):
    logger = CSVLogger(tmp_path, name="csv", version="")
    csv = Path(logger.log_dir)
    csv.mkdir(parents=True)
    for name in ("metrics.csv", "metrics.segment-1.csv", "metrics.segment-3.csv"):  # segment 2 was removed
        (csv / name).write_text(name)
    MetricsFile(tmp_path / "metrics.json", RunRecord()).keep_earlier_segment([logger])
    assert (csv / "metrics.segment-3.csv").read_text() == "metrics.segment-3.csv"
    assert (csv / "metrics.segment-4.csv").read_text() == "metrics.csv" and not (csv / "metrics.csv").exists()


# --- the record's building blocks ------------------------------------------------------------------------


def test_metrics_file_statuses_and_atomic_writes(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    record = MetricsFile(path, RunRecord(dataset="cifar10", ratio=0.5))
    record.write("incomplete")
    m = json.loads(path.read_text())
    assert list(m) == list(METRICS_KEYS) and m["status"] == "incomplete" and m["epochs"] == 0
    record.fail(RuntimeError("boom"))
    record.fail(ValueError("later"))  # the first error is kept
    m = json.loads(path.read_text())
    assert m["status"] == "failed" and m["error"] == "RuntimeError: boom"
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temporary files left
    with pytest.raises(ValueError, match="status"):
        record.write("done")
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    assert json.loads(path.read_text())["status"] == "failed"  # a failed write leaves the old file whole
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


class _FakeModule:
    """Just what PeakMemoryMonitor touches of a LightningModule: device, parameters, log."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.weight = torch.nn.Parameter(torch.randn(8, 8))
        self.logged: dict[str, float] = {}

    def parameters(self):
        return iter([self.weight])

    def log(self, name: str, value: float, **kwargs) -> None:
        self.logged[name] = value


def test_peak_memory_monitor_cuda_bookkeeping(monkeypatch):
    """The CUDA branch, driven hook by hook with torch.cuda's memory functions stubbed (no GPU needed)."""
    calls = []
    peaks = iter([(3 * 2**30, 4 * 2**30), (2 * 2**30, 5 * 2**30)])  # (allocated, reserved) per epoch
    current: dict[str, int] = {}
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda dev: calls.append(("reset", str(dev))))
    monkeypatch.setattr(cuda, "synchronize", lambda dev: calls.append(("sync", str(dev))))
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda dev: current["a"])
    monkeypatch.setattr(cuda, "max_memory_reserved", lambda dev: current["r"])

    monitor, module = PeakMemoryMonitor(warmup_batches=1), _FakeModule("cuda:0")
    monitor.on_fit_start(None, module)
    x = torch.randn(4, 8)
    for epoch in range(2):
        monitor.on_train_epoch_start(None, module)
        for i in range(3):
            batch = (x, torch.zeros(4))
            monitor.on_train_batch_start(None, module, batch, i)
            loss = (x @ module.weight).relu().sum()  # saves x and the relu output for backward
            monitor.on_before_backward(None, module, loss)
            loss.backward()
            monitor.on_train_batch_end(None, module, loss, batch, i)
        current["a"], current["r"] = next(peaks)
        monitor.on_train_epoch_end(None, module)
        assert module.logged["mem/peak_allocated_gib"] == [3.0, 2.0][epoch]

    assert calls.count(("reset", "cuda:0")) == 3 and calls.count(("sync", "cuda:0")) == 12
    summary = RunRecord()
    monitor.fill(summary)
    assert summary.peak_mem_allocated_gib == 3.0 and summary.peak_mem_reserved_gib == 5.0
    assert summary.peak_mem_allocated_gib_per_rank == [3.0]
    assert summary.peak_mem_reserved_gib_per_rank == [5.0]
    assert summary.saved_bytes_per_step == 2 * 4 * 8 * 4  # x and the relu output, float32; not the weight
    assert summary.images_per_s > 0 and monitor.state_dict()["images"] == 5 * 4  # 6 batches, 1 warm-up


def test_peak_memory_monitor_summary_on_cpu():
    monitor = PeakMemoryMonitor(warmup_batches=1)
    measured = {  # what fill sets: every figure, each None here (nothing measured)
        "peak_mem_allocated_gib": 1.0,
        "peak_mem_reserved_gib": 1.0,
        "peak_mem_allocated_gib_per_rank": [1.0],
        "peak_mem_reserved_gib_per_rank": [1.0],
        "saved_bytes_per_step": 1,
        "saved_bytes_per_step_exact": 1,
        "images_per_s": 1.0,
    }
    summary = RunRecord(**measured)
    monitor.fill(summary)
    assert all(getattr(summary, key) is None for key in measured)
    state = {"peak_allocated_gib": 1.5, "peak_reserved_gib": 2.0, "images": 640, "seconds": 2.0}
    monitor.load_state_dict(state)
    summary.images_per_s = 1.0
    monitor.fill(summary)
    assert summary.images_per_s is None  # applied only when a fit resumes, not on test loads
    assert monitor.state_dict()["images"] == 0


@pytest.mark.timeout(240)
def test_sigterm_exits_143_with_a_current_last_ckpt_and_an_interrupted_record(run_train, tmp_path):
    run_dir = tmp_path / "run"
    # no step checkpoints: last.ckpt can only come from the SIGTERM
    proc = run_train(*QUICK, "trainer.limit_train_batches=6", "data.batch_size=16",
                     "callbacks.progress_bar=null", "callbacks.step_checkpoint.every_n_train_steps=0",
                     FAULT,
                     "+callbacks.fault.term_at_step=2", f"hydra.run.dir={run_dir}", cwd=tmp_path,
                     check=False, process=True)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 143 and "Traceback" not in out, out[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"ckpt_path={last}" in out
    # the batch in progress when the signal came (step 2) finished; the state after it was saved
    assert torch.load(last, weights_only=False)["global_step"] == 3
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "interrupted" and m["epochs"] == 0 and m["test_acc"] is None
    assert (
        m["error"].startswith("stopped by SIGTERM at epoch 0, step 3") and f"ckpt_path={last}" in m["error"]
    )
