"""Shared fixtures: the repo's conf/ composed in-process, a tiny saved ViT checkpoint, a subprocess runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

# A few batches of the offline demo: the end-to-end runs of the tests.
QUICK = [
    "experiment=demo",
    # the study's targets: sampled ops with running gradient-norm estimates and the attention matmuls, so
    # these runs exercise every piece of CRS state (the demo's default, the lean block, keeps none)
    "crs.targets=[query,key,value,scores,context]",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]

# A ViT small enough to build in milliseconds: 32 px, 8 px patches (17 tokens), 2 blocks.
TINY_VIT = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every CUDA test `cuda`, so `pytest -m cuda` runs the CUDA variants of the suite (the GPU check's
    step 1): a test parametrized with a CUDA device, or one skipped unless CUDA is there."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_cuda = callspec is not None and any(str(v).startswith("cuda") for v in callspec.params.values())
        reasons = (str(m.kwargs.get("reason", "")).lower() for m in item.iter_markers("skipif"))
        needs_cuda = any("cuda" in reason for reason in reasons)
        if on_cuda or needs_cuda:
            item.add_marker(pytest.mark.cuda)


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
def one_thread():
    """Run torch on one thread: in-process training stays fast on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    """Environment for training subprocesses: offline, one thread (robust on a busy 2-core machine)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_command(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; on a timeout (or the test's own) kill the whole group (the data
    parallel ranks it started too) and fail, instead of leaving processes hanging."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd[2:])} did not finish in {timeout} s\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture
def run_train() -> Callable[..., subprocess.CompletedProcess]:
    """run_train(*args, cwd) -> the finished `python -m vitcrs.train *args` (exit 0 unless check=False).

    A run over `timeout` seconds (a hang) is killed with every process it started, failing the test.
    """

    def _run(*args: str, cwd: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = run_command([sys.executable, "-m", "vitcrs.train", *args], cwd, timeout)
        if check:
            assert proc.returncode == 0, (
                f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
            )
        return proc

    return _run
