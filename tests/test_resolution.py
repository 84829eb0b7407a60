"""Fine-tuning at another resolution than the checkpoint's: interpolated position embeddings, pre-flight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import QUICK, TINY_VIT
from vitcrs.crs import SavedTensorsMeter, uninjected, vit_block_saved_bytes
from vitcrs.errors import ConfigError
from vitcrs.models import ViTClassifier
from vitcrs.train import train

pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec:FutureWarning")

# The tiny test ViT's width and depth at the 224 px / patch 16 geometry of a real checkpoint (197 tokens).
VIT_224 = {**TINY_VIT, "image_size": 224, "patch_size": 16}


@pytest.fixture(scope="module")
def checkpoint_224(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 1000-class 224-px ViT (patch 16) with tiny width, like a Hub checkpoint."""
    from transformers import ViTConfig, ViTForImageClassification

    path = tmp_path_factory.mktemp("vit_224")
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(**VIT_224, num_labels=1000)).save_pretrained(path)
    return path


def test_a_224_px_checkpoint_trains_at_112_px(run_train, checkpoint_224, tmp_path):
    run_dir = tmp_path / "run"
    run_train(*QUICK, "model=vit_tiny", f"model.name_or_path={checkpoint_224}", "data.image_size=112",
              "callbacks.progress_bar=null", f"hydra.run.dir={run_dir}", cwd=tmp_path)  # fmt: skip
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "complete" and m["settings"]["image_size"] == 112
    assert 0.0 <= m["test_acc"] <= 1.0 and m["saved_bytes_per_step"] > 0
    assert m["saved_bytes_per_step_exact"] > m["saved_bytes_per_step"]


def test_a_size_that_is_no_multiple_of_the_patch_fails_before_writing(compose_cfg, checkpoint_224, tmp_path):
    # (the CLI turns a ConfigError into exit status 2 with its message: test_train.py)
    cfg = compose_cfg(*QUICK, "model=vit_tiny", f"model.name_or_path={checkpoint_224}", "data.image_size=100")
    with pytest.raises(ConfigError) as err:
        train(cfg)
    msg = str(err.value)
    assert "data.image_size=100 is invalid" in msg and "patch size 16" in msg
    assert "data.image_size=96 or 112" in msg
    assert not (tmp_path / "run").exists()


def test_saved_bytes_at_the_new_token_count_match_the_analytic_model(checkpoint_224):
    """The memory callback's side-by-side measurement (exact vs injected forward of one batch) differs by
    exactly what the analytic block model says sampling saves per block, at 112 px = 50 tokens."""
    crs = {"ratio": 0.3, "method": "wta_crs", "targets": ["query", "key", "value", "scores", "context"]}
    model = ViTClassifier({"name_or_path": str(checkpoint_224)}, crs, {"lr": 1e-3}, num_labels=10)
    x, batch = torch.randn(4, 3, 112, 112), 4
    params = list(model.parameters())
    with uninjected(model.net), SavedTensorsMeter(exclude=params) as exact:
        exact_logits = model(x)
    with SavedTensorsMeter(exclude=params) as sampled:
        logits = model(x)
    assert torch.equal(logits, exact_logits)  # the forward is exact at the new size too
    shape = (batch, 7 * 7 + 1, VIT_224["hidden_size"], VIT_224["num_attention_heads"],
             VIT_224["intermediate_size"])  # fmt: skip
    cfg = model.crs_config
    per_block = vit_block_saved_bytes(*shape) - vit_block_saved_bytes(*shape, cfg, crs["targets"])
    assert exact.bytes - sampled.bytes == VIT_224["num_hidden_layers"] * per_block > 0


def test_the_bench_keeps_a_checkpoints_position_embeddings_at_another_size(checkpoint_224):
    from transformers import ViTForImageClassification

    from vitcrs.bench import ModelSpec
    from vitcrs.bench.measure import architecture, block_shape, loss_of

    model = ModelSpec("vit_tiny", str(checkpoint_224), 10, {"image_size": 112}).build("eager")
    saved = ViTForImageClassification.from_pretrained(checkpoint_224).vit.embeddings.position_embeddings
    assert torch.equal(model.vit.embeddings.position_embeddings, saved)  # loaded, not re-initialised
    assert block_shape(architecture(model), 2).tokens == 50
    assert loss_of(model, torch.randn(2, 3, 112, 112), torch.tensor([0, 1])).isfinite()
