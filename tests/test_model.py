"""vitcrs.models: checkpoint loading with a fresh head, random init, errors, and the LightningModule."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset
from transformers import ViTForImageClassification

from vitcrs.crs import CRSBlock, grad_norm_sources
from vitcrs.errors import ConfigError
from vitcrs.models import ViTClassifier, build_vit, model_inputs
from vitcrs.models.optim import AdamWInBackward

# Lightning 2.6 uses torch's deprecated pytree LeafSpec; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec:FutureWarning")


def test_checkpoint_gets_a_fresh_head_and_keeps_the_encoder(vit_checkpoint):
    source = ViTForImageClassification.from_pretrained(vit_checkpoint)
    names = [f"class_{i}" for i in range(7)]
    model = build_vit(str(vit_checkpoint), num_labels=7, attn_implementation="eager", class_names=names)
    assert model.classifier.out_features == 7 and model.config.num_labels == 7
    assert model.config.id2label[3] == "class_3" and model.config._attn_implementation == "eager"
    encoder, loaded = source.vit.state_dict(), model.vit.state_dict()
    assert encoder.keys() == loaded.keys()
    assert all(torch.equal(encoder[k], loaded[k]) for k in encoder)


def test_checkpoint_config_overrides_apply(vit_checkpoint):
    model = build_vit(str(vit_checkpoint), 3, "sdpa", config={"hidden_dropout_prob": 0.25})
    assert model.config.hidden_dropout_prob == 0.25 and model.config._attn_implementation == "sdpa"


def test_loading_leaves_the_callers_logging_settings(vit_checkpoint):
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    try:
        build_vit(str(vit_checkpoint), 3)
        assert not hf_logging.is_progress_bar_enabled(), "bars the caller turned off must stay off"
        assert hf_logging.get_verbosity() == verbosity
    finally:
        hf_logging.enable_progress_bar()


def test_random_init_from_config(tiny_vit_config):
    model = build_vit(None, 5, "eager", tiny_vit_config)
    assert model.classifier.out_features == 5 and model.config.hidden_size == tiny_vit_config["hidden_size"]
    logits = model(pixel_values=torch.randn(2, 3, 32, 32)).logits
    assert logits.shape == (2, 5)


def test_model_inputs_read_size_and_normalisation(vit_checkpoint, tmp_path, tiny_vit_config):
    spec = model_inputs(str(vit_checkpoint))
    assert (
        spec.image_size == 32
        and spec.mean == pytest.approx((0.4,) * 3)
        and spec.std == pytest.approx((0.3,) * 3)
    )
    assert model_inputs(str(vit_checkpoint), {"image_size": 64}).image_size == 64
    assert model_inputs(None, tiny_vit_config).mean == (0.5, 0.5, 0.5)
    bare = tmp_path / "no_preprocessor"
    bare.mkdir()
    (bare / "config.json").write_text((vit_checkpoint / "config.json").read_text())
    assert model_inputs(str(bare)).std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("name", ["/no/such/dir", "./relative/missing", "not a hub id"])
def test_missing_checkpoint_is_a_config_error(name):
    with pytest.raises(ConfigError, match=r"model\.name_or_path") as err:
        build_vit(name, 10)
    assert "Hub id" in str(err.value)
    with pytest.raises(ConfigError, match=r"model\.name_or_path"):
        model_inputs(name)


def test_directory_without_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json"):
        build_vit(str(tmp_path), 10)


def test_unknown_attention_is_a_config_error(tiny_vit_config):
    with pytest.raises(ConfigError, match=r"model\.attn_implementation"):
        build_vit(None, 10, "fast", tiny_vit_config)


# --- ViTClassifier ----------------------------------------------------------------------------------------


def _module(tiny_vit_config, **crs) -> ViTClassifier:
    return ViTClassifier(
        model={"name_or_path": None, "attn_implementation": "eager", "config": tiny_vit_config},
        crs={
            "ratio": 0.5,
            "method": "wta_crs",
            "targets": ["query", "key", "value", "scores", "context", "fc1"],
            "min_k": 1,
            "prob": "norm_grad",
            "grad_ema": 0.9,
            **crs,
        },
        optim={"lr": 1e-3, "weight_decay": 0.01, "warmup_fraction": 0.25},
        num_labels=4,
    )


def _loader(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 4), batch_size=4
    )


def _trainer(tmp_path, **kw) -> Trainer:
    return Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, **kw,
    )  # fmt: skip


def test_module_injects_crs_and_saves_hparams(tiny_vit_config):
    module = _module(tiny_vit_config)
    layer = module.net.vit.layers[0]
    assert isinstance(layer, CRSBlock) and set(module.crs.targets) >= {"query", "fc1"}
    assert module.crs_config.ratio == 0.5
    assert module.hparams.optim["lr"] == 1e-3 and module.hparams.num_labels == 4


def test_module_from_a_checkpoint_is_in_train_mode(vit_checkpoint):
    # from_pretrained returns eval mode; Lightning keeps a module's mode, so training would run in eval mode.
    module = ViTClassifier(
        model={"name_or_path": str(vit_checkpoint), "attn_implementation": "eager", "config": None},
        crs={"ratio": 1.0, "targets": ["query"]},
        optim={"lr": 1e-3, "weight_decay": 0.0, "warmup_fraction": 0.0},
        num_labels=3,
    )
    assert all(m.training for m in module.modules())


@pytest.mark.slow
def test_module_trains_schedules_and_checkpoints_crs_state(tiny_vit_config, tmp_path):
    module = _module(tiny_vit_config)
    module.crs.generator.manual_seed(3)
    trainer = _trainer(tmp_path, max_steps=4, enable_checkpointing=False)
    trainer.fit(module, _loader(), _loader(8))
    optimizer = trainer.optimizers[0]
    decays = sorted(g["weight_decay"] for g in optimizer.param_groups)
    assert decays == [0.0, 0.01]  # biases and norm weights are not decayed
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # linear decay to 0 at the last step
    state = {name: s.estimate.clone() for name, s in grad_norm_sources(module.net).items()}
    assert any(e.numel() > 0 for e in state.values())  # norm_grad estimates were updated

    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    rng = module.crs.generator.get_state()
    restored = ViTClassifier.load_from_checkpoint(path)
    for name, s in grad_norm_sources(restored.net).items():
        assert torch.equal(s.estimate, state[name])
    assert restored.crs.generator.get_state()["seed"] == rng["seed"] == 3
    assert torch.equal(restored.crs.generator.get_state()["states"]["cpu"], rng["states"]["cpu"])
    assert restored.crs.generator is not module.crs.generator

    # The checkpoint's weights are the Hugging Face model's: they load, strictly, into a plain one.
    weights = torch.load(path, weights_only=False)["state_dict"]
    plain = ViTForImageClassification(restored.net.config)
    plain.load_state_dict({k.removeprefix("net."): v for k, v in weights.items()}, strict=True)
    x = torch.randn(2, 3, 32, 32)
    restored.eval()
    assert torch.equal(plain.eval()(x).logits, restored(x))


def test_non_finite_loss_stops_training(tiny_vit_config, tmp_path, monkeypatch):
    module = _module(tiny_vit_config)
    real = module.loss

    def nan_loss(batch):
        loss, logits, y = real(batch)
        return loss * math.nan, logits, y

    monkeypatch.setattr(module, "loss", nan_loss)
    trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=False, num_sanity_val_steps=0)
    with pytest.raises(FloatingPointError, match=r"training loss became nan.*optim\.lr"):
        trainer.fit(module, _loader(), _loader(4))


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_non_finite_loss_in_an_accumulated_batch_stops_before_the_step(
    tiny_vit_config, tmp_path, monkeypatch
):
    # The loss is checked once per optimizer step: a NaN in the first of two accumulated micro-batches,
    # followed by a finite one, must still stop the run before that step, with the weights untouched.
    module = _module(tiny_vit_config)
    real, calls = module.loss, []

    def nan_in_third(batch):
        loss, logits, y = real(batch)
        calls.append(len(calls))
        return (loss * math.nan if len(calls) == 3 else loss), logits, y

    monkeypatch.setattr(module, "loss", nan_in_third)
    trainer = _trainer(
        tmp_path, max_steps=3, accumulate_grad_batches=2, enable_checkpointing=False, num_sanity_val_steps=0
    )
    with pytest.raises(
        FloatingPointError, match=r"loss became non-finite in an accumulated batch at .* step 1 "
    ):
        trainer.fit(module, _loader())
    assert trainer.global_step == 1 and len(calls) == 4  # micro-batches 3 (NaN) and 4 ran, step 2 did not
    assert all(torch.isfinite(p).all() for p in module.parameters())


def _optim_module(tiny_vit_config, in_backward: bool) -> ViTClassifier:
    torch.manual_seed(0)
    return ViTClassifier(
        model={"name_or_path": None, "attn_implementation": "eager", "config": tiny_vit_config},
        crs={"ratio": 0.5, "targets": ["lean_block"]},
        optim={"lr": 1e-3, "weight_decay": 0.01, "warmup_fraction": 0.25, "in_backward": in_backward},
        num_labels=4,
        seed=0,
    )


def test_adamw_in_backward_takes_the_same_steps_and_keeps_no_gradients(tiny_vit_config, tmp_path):
    """optim.in_backward: each parameter is updated inside backward (AdamWInBackward), its gradient dropped
    there; the weights after training equal those of AdamW stepping after backward, and the checkpoint's
    optimizer state is an AdamW's."""
    seen = []

    class NoGradients(Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            seen.append(all(p.grad is None for p in module.parameters()))

    runs = {}
    for in_backward in (False, True):
        module = _optim_module(tiny_vit_config, in_backward)
        callbacks = [NoGradients()] if in_backward else []
        trainer = _trainer(tmp_path, max_steps=4, enable_checkpointing=False, callbacks=callbacks)
        trainer.fit(module, _loader(), _loader(8))
        runs[in_backward] = (module, trainer)
    (plain, plain_trainer), (fused, fused_trainer) = runs[False], runs[True]
    assert isinstance(fused_trainer.optimizers[0], AdamWInBackward) and seen == [True] * 4
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        if name.endswith("k_proj.bias"):  # its gradient is zero up to rounding (softmax is shift-invariant)
            continue  # and Adam scales that rounding noise up to lr-sized steps
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)  # fused vs for-loop AdamW kernels
    state = fused_trainer.optimizers[0].state_dict()
    plain_state = plain_trainer.optimizers[0].state_dict()
    assert state["state"].keys() == plain_state["state"].keys()
    assert float(state["state"][0]["step"]) == float(plain_state["state"][0]["step"]) == 4


def test_adamw_in_backward_skips_a_non_finite_gradient_and_stops(tiny_vit_config, tmp_path, monkeypatch):
    module = _optim_module(tiny_vit_config, True)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}

    class NaNGradient(torch.autograd.Function):
        forward = staticmethod(lambda ctx, x: x.clone())
        backward = staticmethod(lambda ctx, g: g * float("nan"))

    def poisoned(batch):  # a finite loss whose gradient is NaN from the logits down
        logits = NaNGradient.apply(module(batch[0]))
        return torch.nn.functional.cross_entropy(logits, batch[1]), logits, batch[1]

    monkeypatch.setattr(module, "loss", poisoned)
    trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=False)
    with pytest.raises(FloatingPointError, match=r"gradients became non-finite.*were not updated"):
        trainer.fit(module, _loader(), _loader(8))
    assert all(torch.isfinite(p).all() for p in module.parameters())  # no non-finite update landed
    for name in ("net.classifier.weight", "net.vit.layernorm.weight"):  # NaN gradients: not updated
        assert torch.equal(module.state_dict()[name], before[name])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val"),
        ("+trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches"),
        ("trainer.precision=16-mixed", "trainer.precision"),
        ("trainer.devices=2", "trainer.devices"),
        ("callbacks.grad_fidelity.every_n_steps=5", "callbacks.grad_fidelity.every_n_steps"),
    ],
)
def test_adamw_in_backward_refuses_what_needs_the_whole_gradient(compose_cfg, override, key):
    from vitcrs.train import validate

    cfg = compose_cfg("experiment=demo", "optim.in_backward=true", "trainer.gradient_clip_val=null", override)
    with pytest.raises(ConfigError, match=rf"optim.in_backward=true .* but {key}=.*optim.in_backward=false"):
        validate(cfg)
