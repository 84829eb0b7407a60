"""What a GPU check runs, with which shapes and time limits: on a GPU, and at tiny shapes on the CPU.

Time limits are in seconds; docs/gpu.md derives the GPU ones from known figures (ViT-B/16 exact eager fp32
about 360 images/s and ViT-Tiny about 1,400 images/s on an H100, docs/gpu.md's sources). A step that ends
early leaves its time to the training step, which gets what is left of the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the whole check: 9 minutes on a GPU; the dry run checks code paths, not time, so it gets room on a busy CPU
BUDGET_S = {"gpu": 540.0, "dry": 900.0}
# the training comparison: exact (ratio 1), the default sampling (conf/crs) and the study's targets, at 0.3
TRAIN_CONFIGS = ("exact", "default", "study")

LIMITS_S = {
    "gpu": {
        "setup": 45,  # wheels are installed before; extracting the 88 MiB JPEG tree, reading the GPU
        # the device tests on the GPU: collection (~10 s), every op, target set and family in fp32 and bf16
        # (about 200 tests of tiny networks; the Monte-Carlo draws are batched)
        "tests": 240,
        # 14 rows + 12 lean-block rows keeping the input alone, in bfloat16, and also updating in backward
        # (--memory), each 7 steps at ≤ 0.45 s + model build + saved-bytes pass ≈ 130 s
        "bench_eager_fp32": 180,
        "bench_sdpa_bf16": 115,  # the same rows at ~4x the speed (1,688 images/s exact) ≈ 80 s
        "report": 30,  # python -m vitcrs.report: reading metrics.json, tables, 3 plots
        "fidelity": 60,  # python -m vitcrs.fidelity on the ViT-Tiny, 4 batches of 64, 3 configurations
    },
    "dry": {
        "setup": 120,
        "tests": 120,
        "bench_eager_fp32": 120,
        "bench_sdpa_bf16": 120,
        "report": 120,
        "fidelity": 120,
    },
}

# seconds of one training run before one of its kind has been timed: process start and data loading (~25 s,
# first run decodes the JPEGs: ~17 s), 20,000 training images at ~1,400 (exact) / ~620 (CRS) images/s,
# validation and test on 15,000 images (~5 s)
TRAIN_PRIOR_S = {"gpu": {"exact": 60.0, "crs": 80.0}, "dry": {"exact": 60.0, "crs": 60.0}}


@dataclass(frozen=True)
class TrainRun:
    """One (configuration, seed) training run of the plan's experiment on the payload's data and model."""

    config: str  # exact | default | study
    seed: int
    crs_overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.config}_s{self.seed}"

    @property
    def kind(self) -> str:
        return "exact" if self.config == "exact" else "crs"


@dataclass(frozen=True)
class Plan:
    """The commands' settings for one mode (`gpu` or `dry`)."""

    mode: str
    device: str
    test_args: tuple[str, ...]  # pytest's arguments (paths relative to the repository)
    bench_model: tuple[str, ...]  # model and run flags of python -m vitcrs.bench
    experiment: str  # conf/experiment of the training runs
    train_overrides: tuple[str, ...]  # besides experiment, model, data and seed
    train_seeds: int
    fidelity_overrides: tuple[str, ...] = ()  # python -m vitcrs.fidelity: besides model and data
    train_configs: tuple[str, ...] = TRAIN_CONFIGS
    ratio: float = 0.3
    bench_ratios: str = "0.5,0.3"
    bench_targets: tuple[str, ...] | None = None  # target sets of the bench rows; None: every sound one
    # the bench's --memory modes (the memory floor's rows)
    bench_memory: str = "default,keep_input,keep_input_bf16,floor_bf16"
    budget_s: float = 540.0
    limits_s: dict[str, float] = field(default_factory=dict)
    train_prior_s: dict[str, float] = field(default_factory=dict)

    def limit(self, step: str) -> float:
        return float(self.limits_s[step])


def make_plan(
    dry_run: bool,
    seeds: int | None,
    train_images: int,
    epochs: int,
    budget_s: float | None,
    configs: tuple[str, ...] = TRAIN_CONFIGS,
) -> Plan:
    """The plan of a GPU check, or of the dry run (CPU, tiny shapes, fewer draws, rows and test files)."""
    mode = "dry" if dry_run else "gpu"
    if dry_run:
        bench = (
            "--model",
            "vit_tiny",
            "--layers",
            "1",
            "--image-size",
            "32",
            "--patch-size",
            "8",
            "--batch-size",
            "4",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--device",
            "cpu",
            "--time-on-cpu",
        )
        train = ("data.batch_size=8",)  # experiment=smoke: a few batches on the CPU
        # the device tests, collected on the CPU (the suite runs them there itself)
        tests = ("--device", "cpu", "-m", "device or cuda", "--collect-only", "tests")
        # the dry payload has 43 training images: 2 noise batches of 8 fit (the defaults, 4 of 64, do not)
        fidelity = (
            "data.batch_size=8",
            "data.num_workers=0",
            "fidelity.noise_batches=2",
            "fidelity.draws=3",
            "fidelity.prime_passes=1",
            "fidelity.device=cpu",
        )
    else:
        bench = (
            "--model",
            "vit_b16",
            "--batch-size",
            "64",
            "--warmup",
            "2",
            "--steps",
            "5",
            "--device",
            "cuda",
        )
        train = (
            "trainer.accelerator=gpu",
            f"trainer.max_epochs={epochs}",
            f"data.limit_train={train_images}",
        )
        fidelity = ("fidelity.device=cuda",)
        tests = ("--device", "cuda", "-m", "device or cuda", "tests")

    return Plan(
        mode=mode,
        device="cpu" if dry_run else "cuda",
        test_args=tests,
        bench_model=bench,
        experiment="smoke" if dry_run else "study_tiny",
        train_overrides=(*train, "callbacks.progress_bar=null"),
        train_seeds=seeds if seeds is not None else (1 if dry_run else 3),
        fidelity_overrides=fidelity,
        train_configs=configs,
        bench_ratios="0.3" if dry_run else "0.5,0.3",
        bench_targets=("lean_block",) if dry_run else None,  # the dry run: its code path, at the least cost
        budget_s=budget_s if budget_s is not None else BUDGET_S[mode],
        limits_s=dict(LIMITS_S[mode]),
        train_prior_s=dict(TRAIN_PRIOR_S[mode]),
    )


def override_value(value: Any) -> str:
    """`value` in Hydra's override grammar (lists and dicts included)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return text if text.replace("_", "").replace("-", "").replace(".", "").isalnum() else repr(text)


def crs_nodes(conf_dir: Path, experiment: str) -> tuple[dict, dict]:
    """The `crs` node of the default configuration and of `experiment`, as composed by Hydra."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vitcrs.conf import register

    register()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        default = OmegaConf.to_container(compose("config").crs, resolve=False)
        study = OmegaConf.to_container(
            compose("config", overrides=[f"experiment={experiment}"]).crs, resolve=False
        )
    return default, study  # type: ignore[return-value]


def train_runs(plan: Plan, conf_dir: Path) -> tuple[list[TrainRun], str]:
    """(config, seed) runs in the order they are tried (every config of seed 0 first), and a note.

    exact: crs.ratio=1; study: the experiment's own sampling at `plan.ratio`; default: the `crs` settings of
    conf/crs (whatever the default is at run time) at `plan.ratio`, left out when they equal the study's.
    """
    default, study = crs_nodes(conf_dir, plan.experiment)
    without_ratio = {k: v for k, v in default.items() if k != "ratio"}
    ratio = f"crs.ratio={plan.ratio}"
    configs = {"exact": ("crs.ratio=1.0",)}
    note = ""
    if without_ratio == {k: v for k, v in study.items() if k != "ratio"}:
        note = "the default crs settings equal the study's, so 'default' is not run separately"
    else:
        configs["default"] = (*(f"crs.{k}={override_value(v)}" for k, v in without_ratio.items()), ratio)
    configs["study"] = (ratio,)
    runs = [
        TrainRun(c, s, o)
        for s in range(plan.train_seeds)
        for c, o in configs.items()
        if c in plan.train_configs
    ]
    return runs, note
