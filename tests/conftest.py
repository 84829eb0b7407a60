"""Shared fixtures: the repo's conf/ composed in-process, a tiny saved ViT checkpoint, a subprocess runner."""

from __future__ import annotations

import json
import logging
import os
import runpy
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from support.processes import Finished, run_command

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CONF_DIR = REPO / "conf"

# A few batches of the offline demo with the study's targets (conf/experiment/smoke.yaml): the tests' runs.
QUICK = ["experiment=smoke"]

# A ViT small enough to build in milliseconds: 32 px, 8 px patches (17 tokens), 2 blocks.
TINY_VIT = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def pytest_configure(config: pytest.Config) -> None:
    """torch on one thread, as the tests' subprocesses (`quiet_env`): their tensors are tiny, so a second
    thread costs more than it gives, above all on a busy 2-core machine; and in-process runs then compute
    what a subprocess computes, to the bit."""
    torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="the torch device of the device tests (the `device` fixture), e.g. cuda: the GPU check runs "
        "`pytest --device cuda -m 'device or cuda'`",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests that run on `--device` (they take the `device` fixture) `device`, and those that need
    CUDA whatever the option (skipped without it) `cuda`: `-m "device or cuda"` selects the GPU check's. The
    tests that run `python -m vitcrs.train` (`run_train`, `ratio_sweep`) are `slow`, as are those marked so
    (`make test-fast` leaves them out). Slow tests run first, so that the xdist workers finish together."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "device" in fixtures:
            item.add_marker(pytest.mark.device)
        if {"run_train", "ratio_sweep"} & set(fixtures):  # a training run end to end, or a process of its own
            item.add_marker(pytest.mark.slow)
        reasons = (str(m.kwargs.get("reason", "")).lower() for m in item.iter_markers("skipif"))
        if any("cuda" in reason for reason in reasons):
            item.add_marker(pytest.mark.cuda)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """The device of `--device` (default cpu); the run stops when it names CUDA and there is none."""
    dev = torch.device(pytestconfig.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.exit(f"--device {dev}: torch sees no CUDA device here", returncode=4)
    return dev


@pytest.fixture(autouse=True)
def no_hydra_state_left():
    """Leave no Hydra app state behind (an in-process `hydra.main` run sets HydraConfig for the process), so a
    test never reads another test's run choices."""
    yield
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


@pytest.fixture
def fresh_crs_stream():
    """Seed torch with 0 for the test: unseeded injected models (and the functional ops) draw from it."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_vit_config() -> dict[str, int]:
    """ViTConfig fields of a ViT that builds in milliseconds."""
    return dict(TINY_VIT)


def compose_config(config_name: str, *overrides: str, hydra_node: bool = False) -> DictConfig:
    """conf/`config_name` (config or fidelity) composed with `overrides`, as the app would compose it
    (`vitcrs.conf.register` first); with `hydra_node`, Hydra's own node too."""
    from vitcrs.conf import register

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=hydra_node)


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """compose_cfg(*overrides) -> the composed training config, with run_dir and data.root in tmp_path."""

    def _compose(*overrides: str) -> DictConfig:
        return compose_config(
            "config", f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", *overrides
        )

    return _compose


@pytest.fixture(scope="session")
def vit_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 1000-class ViTForImageClassification (like a Hub checkpoint) with mean 0.4 / std 0.3."""
    from transformers import ViTConfig, ViTForImageClassification

    path = tmp_path_factory.mktemp("vit_ckpt")
    ViTForImageClassification(ViTConfig(**TINY_VIT, num_labels=1000)).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_processor_type": "ViTImageProcessor", "image_mean": [0.4] * 3, "image_std": [0.3] * 3}
        )
    )
    return path


def quiet_env() -> dict[str, str]:
    """Environment for the tests' subprocesses: offline, one thread (robust on a busy 2-core machine), and
    tests/ on the path (a run may add `support.faults.FaultInjector` as a callback)."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def run(cmd: list[str], cwd: Path, timeout: float = 300, **env: str) -> Finished:
    """`cmd` run to its end in `quiet_env` and `env` (`support.processes.run_command`); a run over `timeout`
    seconds (a hang) is stopped with every process it started and fails the test."""
    done = run_command(cmd, cwd=cwd, env={**quiet_env(), **env}, timeout=timeout, grace_s=5.0)
    if done.timed_out:
        output = f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        pytest.fail(f"{shlex.join(cmd[2:])} did not finish in {timeout} s\n{output}")
    return done


def run_module(
    module: str, args: Sequence[str], cwd: Path, capsys: pytest.CaptureFixture[str] | None = None
) -> Finished:
    """`python -m module *args` in `cwd`, run in this process (runpy: its __main__ and, for a Hydra app,
    Hydra's own command line, run dir, saved config and logging), with its exit status and output; the
    process's working directory, argv, logging and Hydra state are as they were afterwards."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    root = logging.getLogger()
    handlers, level, argv, where = root.handlers[:], root.level, sys.argv, os.getcwd()
    if capsys is not None:
        capsys.readouterr()  # what earlier code printed is not this command's
    start, code = time.monotonic(), 0
    try:
        os.chdir(cwd)
        sys.argv = [module, *args]
        with warnings.catch_warnings():  # runpy: the module is imported already (as the launchers import it)
            warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        os.chdir(where)
        sys.argv = argv
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return Finished((module, *args), code, time.monotonic() - start, out, err)


@pytest.fixture(scope="session")
def ratio_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sweep dir of `python -m vitcrs.train -m experiment=smoke crs.ratio=1.0,0.3`, run once (in this
    process) for the tests that read a two-job sweep: its run dirs, its report."""
    where = tmp_path_factory.mktemp("ratio_sweep")
    args = [
        "-m",
        *QUICK,
        "crs.ratio=1.0,0.3",
        "callbacks.progress_bar=null",
        f"hydra.sweep.dir={where / 'sweep'}",
    ]
    done = run_module("vitcrs.train", args, where)
    assert done.returncode == 0, "the two-ratio sweep failed"
    return where / "sweep"


@pytest.fixture
def run_train(capsys: pytest.CaptureFixture[str]) -> Callable[..., Finished]:
    """run_train(*args, cwd) -> the finished `python -m vitcrs.train *args` (exit 0 unless check=False): in
    this process (`run_module`), or, with `process=True`, as a subprocess (`run`: for what needs a process of
    its own: a kill, a signal, data-parallel ranks, launcher workers, the command line itself)."""

    def _run(
        *args: str, cwd: Path, check: bool = True, timeout: float = 300, process: bool = False
    ) -> Finished:
        if process:
            proc = run([sys.executable, "-m", "vitcrs.train", *args], cwd, timeout)
        else:
            proc = run_module("vitcrs.train", args, cwd, capsys)
        if check:
            assert proc.returncode == 0, (
                f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
            )
        return proc

    return _run
