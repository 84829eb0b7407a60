"""Command line of `python -m gpu_check` (scripts/gpu_check.sh): run the steps in order within a time
budget."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from support.processes import run_command
from vitcrs.units import GIB

from .fixtures import Payload, extract, write_dry_run_payload
from .plan import TRAIN_CONFIGS, Plan, TrainRun, make_plan, train_runs
from .steps import FAILED, NOT_RUN, OK, SKIPPED, TIMEOUT, StepRecord, tail
from .summary import combine_bench, write_bundle, write_summary, write_summary_json

REPO = Path(__file__).resolve().parents[2]  # the repository: src/, conf/, tests/, tools/
SRC = REPO / "src"
STEPS = ("tests", "bench", "train", "report", "fidelity")
BENCH_RUNS = (("bench_eager_fp32", "eager", "fp32"), ("bench_sdpa_bf16", "sdpa", "bf16-mixed"))
SUMMARY_STEPS = ("setup", "tests", "bench_eager_fp32", "bench_sdpa_bf16", "train", "report", "fidelity")
TITLES = {
    "setup": "payload, data extraction, device",
    "tests": "the test suite's device tests on the GPU (every op, target set and family; fp32 and bf16)",
    "bench_eager_fp32": "bench: ViT-B/16 batch 64, eager fp32",
    "bench_sdpa_bf16": "bench: ViT-B/16 batch 64, sdpa bf16 autocast",
    "train": "study_tiny training on CIFAR-10 (ViT-Tiny; the dry run: experiment=smoke)",
    "report": "python -m vitcrs.report",
    "fidelity": "python -m vitcrs.fidelity",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bash scripts/gpu_check.sh",
        description="GPU evidence in one command: the test suite's device tests on the GPU, the headline "
        "bench rows (ViT-B/16 batch 64), study_tiny training on the real CIFAR-10, its report and the "
        "fidelity meter, within a time budget. Every step's results are written to OUT_DIR as soon as it "
        "ends. See docs/gpu.md.",
    )
    p.add_argument(
        "out", type=Path, help="output folder (created; summary.md, summary.json, gpu_check.log, ...)"
    )
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, generated data and model")
    p.add_argument("--payload", type=Path, help="folder of scripts/gpu_payload.sh (default <repo>/.carry)")
    p.add_argument("--work", type=Path, help="where the data is extracted (default a temporary folder)")
    p.add_argument(
        "--bundle",
        type=Path,
        help="after every step also write gpu_check.tar.gz, summary.md and "
        "gpu_check.log here (for the device tool's $OUT: few files, no deep folders)",
    )
    p.add_argument("--budget", type=float, help="seconds for the whole check (default 540; dry run 900)")
    p.add_argument(
        "--keep-going", action="store_true", help="run the later steps even when step 1 (the tests) fails"
    )
    p.add_argument("--steps", default=",".join(STEPS), help=f"which steps to run (default {','.join(STEPS)})")
    p.add_argument(
        "--configs",
        default=",".join(TRAIN_CONFIGS),
        help="training configurations: exact (ratio 1), default (conf/crs at ratio 0.3), study (the study's "
        f"targets at 0.3); default {','.join(TRAIN_CONFIGS)}",
    )
    p.add_argument("--seeds", type=int, help="training seeds to try, 0..N-1 (default 3; dry run 1)")
    p.add_argument(
        "--train-images", type=int, default=20000, help="training images per run on a GPU (default 20000)"
    )
    p.add_argument("--epochs", type=int, default=1, help="epochs per training run on a GPU (default 1)")
    return p


class GPUCheck:
    """The steps of one check, writing their records, the log and the summary into `out` as they end."""

    def __init__(self, args: argparse.Namespace, plan: Plan, argv: Sequence[str]) -> None:
        self.args, self.plan, self.out = args, plan, args.out.resolve()
        self.start = time.monotonic()
        self.deadline = self.start + plan.budget_s
        self.records = {name: StepRecord(name, TITLES[name]) for name in SUMMARY_STEPS}
        self.meta: dict = {
            "command": "bash scripts/gpu_check.sh " + " ".join(argv),
            "mode": plan.mode,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "budget_s": plan.budget_s,
        }
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.out.mkdir(parents=True, exist_ok=True)
        self.logfile = self.out / "gpu_check.log"

    # ------------------------------------------------------------ bookkeeping
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, msg: str) -> None:
        line = f"[gpu_check {time.monotonic() - self.start:6.1f} s] {msg}"
        print(line, flush=True)
        with self.logfile.open("a") as f:
            f.write(line + "\n")

    def save(self) -> None:
        self.meta["elapsed_s"] = round(time.monotonic() - self.start, 1)
        data = {"meta": self.meta, "steps": [r.to_dict() for r in self.records.values()]}
        write_summary_json(self.out, data)
        write_summary(self.out, data)
        if self.args.bundle:
            write_bundle(self.out, self.args.bundle)

    def finish(self, record: StepRecord, status: str, seconds: float, note: str = "") -> None:
        record.status, record.seconds, record.note = status, round(seconds, 1), note or record.note
        self.log(
            f"{record.name}: {status} in {record.seconds:.0f} s"
            + (f" ({record.note})" if record.note else "")
        )
        if status in (FAILED, TIMEOUT) and record.log:
            with self.logfile.open("a") as f:
                f.write(f"--- last lines of {record.log}\n{tail(self.out / record.log)}\n---\n")
        self.save()

    def command(self, record: StepRecord, argv: list[str], limit_s: float):
        """Run one command of a step (limit capped by what is left of the budget), logging into its log."""
        record.commands.append(" ".join(argv))
        record.log = f"logs/{record.name}.log"
        limit = min(limit_s, max(self.left(), 1.0))
        return run_command(argv, cwd=REPO, env=self.env, timeout=limit, log=self.out / record.log)

    def limit(self, step: str) -> float:
        record = self.records[step]
        record.limit_s = min(self.plan.limit(step), max(self.left(), 0.0))
        return record.limit_s

    # ------------------------------------------------------------ steps
    def setup(self) -> tuple[Path, Path] | None:
        record, t0 = self.records["setup"], time.monotonic()
        record.limit_s = self.plan.limit("setup")
        import torch

        env = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "vitcrs_src": str(SRC),
        }
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
            (self.out / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr)
        (self.out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
        self.meta["device"] = env.get("gpu", "CPU (dry run)" if self.plan.mode == "dry" else "no GPU")
        record.outputs = ["env.json"]
        if self.plan.device == "cuda" and not torch.cuda.is_available():
            self.finish(
                record, FAILED, time.monotonic() - t0, "torch sees no CUDA GPU: use --dry-run on a CPU"
            )
            return None
        work = self.args.work or Path(tempfile.gettempdir()) / "vitcrs_gpu_check"
        if self.plan.mode == "dry":
            payload = write_dry_run_payload(Path(tempfile.mkdtemp(prefix="payload_", dir=_mkdir(work))))
        else:
            payload = Payload(self.args.payload or REPO / ".carry")
        missing = payload.missing()
        if missing:
            self.finish(
                record,
                FAILED,
                time.monotonic() - t0,
                f"payload incomplete, missing {', '.join(missing)}: run scripts/gpu_payload.sh",
            )
            return None
        tree = extract(payload.archive, work / ("dry" if self.plan.mode == "dry" else "data"))
        self.meta.update(data=str(tree), model=str(payload.model))
        self.finish(record, OK, time.monotonic() - t0, f"data {tree}, model {payload.model}")
        return tree, payload.model

    def tests(self) -> bool:
        """The suite's device tests with the plan's device (collected only, in the dry run)."""
        record = self.records["tests"]
        if not (REPO / "tests").is_dir():
            self.finish(record, SKIPPED, 0.0, f"no tests/ folder beside {SRC}")
            return True
        junit = "tests/junit.xml"
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *self.plan.test_args]
        argv += ["--junitxml", str(self.out / junit)]
        done = self.command(record, argv, self.limit("tests"))
        record.outputs = [junit, record.log]
        status = TIMEOUT if done.timed_out else OK if done.returncode == 0 else FAILED
        self.finish(record, status, done.seconds, _last_line(self.out / record.log))
        return status == OK

    def bench(self, step: str, attn: str, precision: str) -> None:
        """One bench process in attn/precision: exact and each sound target set, checkpointing off and on,
        and the plan's memory modes (lean-block rows keeping the input alone, also updating in backward)."""
        from vitcrs.bench.grid import BENCH_TARGET_SETS
        from vitcrs.crs import MATMUL_TARGETS, TARGET_SETS

        # sound target sets: every activation gradient exact (no attention matmul sampled)
        sound = [name for name in BENCH_TARGET_SETS if not set(TARGET_SETS[name]) & set(MATMUL_TARGETS)]
        sound = [name for name in sound if name in (self.plan.bench_targets or sound)]
        record = self.records[step]
        folder = f"bench/{attn}_{precision}"
        grid = ["--methods", "wta_crs", "--ratios", self.plan.bench_ratios, "--targets", ",".join(sound)]
        rows = ["--attn", attn, "--precision", precision, "--checkpointing", "off,on"]
        rows += ["--memory", self.plan.bench_memory]
        argv = [sys.executable, "-m", "vitcrs.bench", *self.plan.bench_model, *grid, *rows]
        argv += ["--out", str(self.out / folder)]
        done = self.command(record, argv, self.limit(step))
        record.outputs = [f"{folder}/bench.md", f"{folder}/bench.json", record.log]
        status = TIMEOUT if done.timed_out else OK if done.returncode == 0 else FAILED
        count = _bench_rows(self.out / folder / "bench.json")
        note = f"{count} rows; target sets {', '.join(sound)}" if count else ""
        combine_bench(self.out / "bench", [self.out / f"bench/{a}_{p}" for _, a, p in BENCH_RUNS])
        self.finish(record, status, done.seconds, note)

    def train(self, tree: Path, model: Path, reserve_s: float) -> None:
        from vitcrs.conf import CONF_DIR

        record, t0 = self.records["train"], time.monotonic()
        runs, note = train_runs(self.plan, CONF_DIR)
        record.limit_s = max(self.left() - reserve_s, 0.0)
        record.note = note
        record.commands = []
        record.log = "logs/train.log"
        record.outputs = ["train/", record.log]
        timed: dict[str, float] = {}
        done_runs, skipped = [], []
        any_failed = False
        for run in runs:
            left = self.left() - reserve_s
            estimate = timed.get(run.config, self.plan.train_prior_s[run.kind])
            if estimate > left:
                skipped.append(run.name)
                continue
            self.log(
                f"train {run.name}: starting ({left:.0f} s left for training, estimate {estimate:.0f} s)"
            )
            argv = self._train_argv(run, tree, model)
            record.commands.append(" ".join(argv))
            finished = run_command(argv, cwd=REPO, env=self.env, timeout=left, log=self.out / record.log)
            timed[run.config] = max(timed.get(run.config, 0.0), finished.seconds)
            status = TIMEOUT if finished.timed_out else OK if finished.returncode == 0 else FAILED
            any_failed = any_failed or status != OK
            done_runs.append(f"{run.name} {status}")
            self.log(f"train {run.name}: {status} in {finished.seconds:.0f} s")
            record.note = "; ".join(filter(None, [note, f"ran {', '.join(done_runs)}"]))
            record.seconds = round(time.monotonic() - t0, 1)
            self.save()
        if skipped:
            record.note += f"; not run (no time left): {', '.join(skipped)}"
        status = OK if done_runs and not any_failed else FAILED if done_runs else NOT_RUN
        self.finish(record, status, time.monotonic() - t0, record.note)

    def _train_argv(self, run: TrainRun, tree: Path, model: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "vitcrs.train",
            f"experiment={self.plan.experiment}",
            "model=vit_tiny",
            f"model.name_or_path={model}",
            "dataset=imagefolder",
            f"data.root={tree}",
            "data.name=cifar10",  # the JPEG tree is the real CIFAR-10: report it under that name
            *self.plan.train_overrides,
            *run.crs_overrides,
            f"seed={run.seed}",
            f"hydra.run.dir={self.out / 'train' / run.name}",
        ]

    def report(self) -> None:
        record = self.records["report"]
        if not list((self.out / "train").glob("*/metrics.json")):
            self.finish(record, SKIPPED, 0.0, "no training run wrote metrics.json")
            return
        argv = [
            sys.executable,
            "-m",
            "vitcrs.report",
            str(self.out / "train"),
            "--out",
            str(self.out / "report"),
        ]
        done = self.command(record, argv, self.limit("report"))
        record.outputs = ["report/index.md", "report/accuracy.md", "report/memory.md", record.log]
        status = TIMEOUT if done.timed_out else OK if done.returncode == 0 else FAILED
        self.finish(record, status, done.seconds)

    def fidelity(self, tree: Path, model: Path) -> None:
        record = self.records["fidelity"]
        argv = [
            sys.executable,
            "-m",
            "vitcrs.fidelity",
            "model=vit_tiny",
            f"model.name_or_path={model}",
            "dataset=imagefolder",
            f"data.root={tree}",
            *self.plan.fidelity_overrides,
            f"hydra.run.dir={self.out / 'fidelity'}",
        ]
        done = self.command(record, argv, self.limit("fidelity"))
        record.outputs = ["fidelity/", record.log]
        status = TIMEOUT if done.timed_out else OK if done.returncode == 0 else FAILED
        self.finish(record, status, done.seconds, _last_line(self.out / record.log) if status != OK else "")

    # ------------------------------------------------------------ the whole check
    def guarded(self, step: str, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`; an exception of the check's own code fails that step (traceback in the log), not the
        whole check."""
        try:
            return fn(*args)
        except Exception as exc:
            with self.logfile.open("a") as f:
                f.write(traceback.format_exc())
            self.finish(
                self.records[step], FAILED, self.records[step].seconds, f"{type(exc).__name__}: {exc}"
            )
            return None

    def run(self, steps: set[str]) -> int:
        self.log(f"{self.plan.mode} check into {self.out}, budget {self.plan.budget_s:.0f} s")
        self.save()
        ready = self.guarded("setup", self.setup)
        if ready is None:
            self._not_run("setup failed")
            return 2
        tree, model = ready
        ok = "tests" not in steps or bool(self.guarded("tests", self.tests))
        if not ok and not self.args.keep_going:
            self._not_run("step 1 (the device tests) failed: fix that first (or --keep-going)")
            return 1
        if "bench" in steps:
            for step, attn, precision in BENCH_RUNS:
                self.guarded(step, self.bench, step, attn, precision)
        if "train" in steps:
            reserve = self.plan.limit("report") + (
                self.plan.limit("fidelity") if "fidelity" in steps else 0.0
            )
            self.guarded("train", self.train, tree, model, reserve)
        if "report" in steps:
            self.guarded("report", self.report)
        if "fidelity" in steps:
            self.guarded("fidelity", self.fidelity, tree, model)
        self._not_run("not asked for (--steps)")
        failed = [r.name for r in self.records.values() if r.status in (FAILED, TIMEOUT)]  # every step counts
        self.log("done: " + (f"failed: {', '.join(failed)}" if failed else "every step that ran passed"))
        return 1 if failed else 0

    def _not_run(self, why: str) -> None:
        for r in self.records.values():
            if r.status == NOT_RUN and not r.note:
                r.note = why
        self.save()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _last_line(path: Path) -> str:
    lines = [ln for ln in tail(path, 5).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _bench_rows(path: Path) -> int:
    try:
        return len(json.loads(path.read_text())["rows"])
    except (OSError, ValueError, KeyError):
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    steps = {s.strip() for s in args.steps.split(",") if s.strip()}
    unknown = steps - set(STEPS)
    if unknown or not steps:
        print(f"error: --steps {args.steps!r}: choose from {', '.join(STEPS)}", file=sys.stderr)
        return 2
    for name in ("seeds", "train_images", "epochs", "budget"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"error: --{name.replace('_', '-')}={value}: it must be at least 1", file=sys.stderr)
            return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"error: OUT_DIR {args.out} is a file: give a folder", file=sys.stderr)
        return 2
    configs = tuple(c.strip() for c in args.configs.split(",") if c.strip())
    if not configs or set(configs) - set(TRAIN_CONFIGS):
        print(f"error: --configs {args.configs!r}: choose from {', '.join(TRAIN_CONFIGS)}", file=sys.stderr)
        return 2
    plan = make_plan(args.dry_run, args.seeds, args.train_images, args.epochs, args.budget, configs)
    check = GPUCheck(args, plan, argv)
    code = check.run(steps)
    print((check.out / "summary.md").read_text(), flush=True)
    return code
