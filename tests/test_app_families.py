"""Every model family (Hugging Face ViT / DeiT / DINOv2, timm ViT) through the app: training, resuming, local
timm weights, the fidelity meter, the bench, and the errors of a bad model node (CPU, offline)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import QUICK
from vitcrs import bench
from vitcrs.conf import check_added_keys
from vitcrs.crs import CRSConfig, sample_cache_bytes_per_image
from vitcrs.errors import ConfigError
from vitcrs.fidelity.meter import Configuration, measure
from vitcrs.models import FAMILIES, ViTClassifier, model_family
from vitcrs.models.fidelity import measured_parameters, parameter_block, parameter_kind
from vitcrs.train import train, validate

# timm is an optional extra (pip install "vitcrs[timm]"); make install has it
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason='pip install -e ".[timm]"')
pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec:FutureWarning")

MICRO = [pytest.param("timm_micro", marks=needs_timm), "deit_micro", "dinov2_micro"]
# a timm ViT that builds in milliseconds: 32 px, 8 px patches (16 patches + class token), 2 blocks
TIMM_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


def timm_node(**config) -> dict:
    """The model node of a random-init timm ViT of TIMM_TINY's shape, `config` on top."""
    node = {
        "family": "timm",
        "name": "vit_tiny_patch16_224",
        "pretrained": False,
        "attn_implementation": "eager",
    }
    return {**node, "config": {**TIMM_TINY, **config}}


# --- training and resuming, each family ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("model", MICRO)
def test_each_family_trains_and_its_checkpoint_resumes(compose_cfg, tmp_path, model):
    """model=X dataset=synthetic crs.ratio=0.3 (QUICK: the demo's data, a few batches) writes a complete
    record; its checkpoint passes the resume check (the architecture read through the family) and reloads
    exactly."""
    run = [*QUICK, f"model={model}", "callbacks.progress_bar=null"]
    train(compose_cfg(*run))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "complete" and m["ratio"] == 0.3 and m["settings"]["model"] == "random-init"
    assert 0.0 <= m["test_acc"] <= 1.0 and m["saved_bytes_per_step"] < m["saved_bytes_per_step_exact"]

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    resumed = validate(compose_cfg(*run, "trainer.max_epochs=2", f"ckpt_path={last}"))
    assert resumed.ckpt_path == str(last)
    wider = {"timm_micro": "model.config.embed_dim=32", "deit_micro": "model.config.hidden_size=32",
             "dinov2_micro": "model.config.hidden_size=32"}[model]  # fmt: skip
    with pytest.raises(ConfigError, match="another architecture"):
        validate(compose_cfg(*run, "trainer.max_epochs=2", f"ckpt_path={last}", wider))

    restored = ViTClassifier.load_from_checkpoint(last)
    saved = torch.load(last, weights_only=False)["state_dict"]
    assert restored.family.name == model_family(dict(restored.hparams.model)).name
    assert all(torch.equal(v, saved[k]) for k, v in restored.state_dict().items())


@pytest.mark.slow
@needs_timm
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_timm_run_resumes_to_its_second_epoch(compose_cfg, tmp_path):
    """Fit goes on from a timm checkpoint (weights, optimizer, CRS state with drop path and layer scale)."""
    run = [*QUICK, "model=timm_micro", "callbacks.progress_bar=null", "crs.prob=norm_grad"]
    train(compose_cfg(*run))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    train(compose_cfg(*run, "trainer.max_epochs=2", f"ckpt_path={last}"))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "complete" and m["epochs"] == 2


# --- the interface: inputs, architecture, heads, logits ----------------------------------------------------


@needs_timm
def test_token_counts_include_every_prefix_token():
    timm_family = FAMILIES["timm"]
    assert timm_family.meta_architecture(timm_node(), 10).tokens() == 17  # 16 patches + class token
    no_class = timm_node(class_token=False, global_pool="avg")
    assert timm_family.meta_architecture(no_class, 10).tokens() == 16
    assert timm_family.meta_architecture(timm_node(reg_tokens=4), 10).tokens(64) == 64 + 5
    deit = {"family": "hf_deit", "name_or_path": None, "with_teacher": True,
            "config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "intermediate_size": 64}}  # fmt: skip
    arch = FAMILIES["hf_deit"].meta_architecture(deit, 10)
    assert (arch.tokens(), arch.prefix_tokens, arch.num_hidden_layers, arch.intermediate_size) == (
        18,
        2,
        2,
        64,
    )
    assert "cls_classifier.weight" in arch.parameter_shapes and arch.parameter_shapes[
        "cls_classifier.weight"
    ] == (
        10,
        32,
    )


def test_deit_with_teacher_predicts_the_mean_of_both_heads(compose_cfg):
    node = OmegaConf.to_container(compose_cfg("model=deit_micro").model)
    family = model_family(node)
    torch.manual_seed(0)
    net = family.build(node, 5).eval()
    x = torch.randn(2, 3, 32, 32)
    out = net(pixel_values=x)
    assert torch.allclose(family.logits(net, x), (out.cls_logits + out.distillation_logits) / 2)
    assert not torch.allclose(out.cls_logits, out.distillation_logits)  # two heads, each its own
    assert family.head_prefixes(net) == ("cls_classifier.", "distillation_classifier.")
    assert not [n for n, _ in measured_parameters(net) if "classifier" in n]
    one = family.build({**node, "with_teacher": False}, 5)
    assert family.head_prefixes(one) == ("classifier.",) and family.logits(one, x).shape == (2, 5)


def test_sample_cache_size_counts_the_distillation_token(compose_cfg):
    cfg = compose_cfg("model=deit_micro", "crs.prob=sample_cache")
    model = ViTClassifier(model=OmegaConf.to_container(cfg.model), crs=OmegaConf.to_container(cfg.crs),
                          optim=OmegaConf.to_container(cfg.optim), num_labels=10)  # fmt: skip
    summary = model.sample_cache_summary()
    targets = model.crs.targets
    assert summary["bytes_per_image"] == sample_cache_bytes_per_image(66, 64, 4, 4, targets, "bfloat16")


@needs_timm
def test_timm_logits_at_another_image_size_interpolate_the_position_embeddings():
    family = FAMILIES["timm"]
    assert family.inputs(timm_node()).image_size == 32 and family.inputs(timm_node()).patch_size == 8
    net = family.build(timm_node(), 3, image_size=48)
    assert family.logits(net, torch.randn(2, 3, 48, 48)).shape == (2, 3)
    assert net.pos_embed.shape[1] == 17  # the model's own grid, resampled in each forward
    assert all(not m.fused_attn for m in net.modules() if hasattr(m, "fused_attn"))  # eager: samplable
    assert all(m.fused_attn for m in family.build({**timm_node(), "attn_implementation": "sdpa"}, 3).modules()
               if hasattr(m, "fused_attn"))  # fmt: skip


@needs_timm
def test_timm_vit_loads_local_weights_with_a_fresh_head(compose_cfg, tmp_path):
    """model=timm_vit model.weights=<file>: the encoder is the file's, the head new (the dataset's size)."""
    import timm

    name = "vit_tiny_patch16_224.augreg_in21k"
    torch.manual_seed(1)
    source = timm.create_model(name, pretrained=False, **TIMM_TINY)  # its pretrained head: 21,843 classes
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    config = "{" + ",".join(f"{k}:{v}" for k, v in TIMM_TINY.items()) + "}"
    cfg = compose_cfg("model=timm_vit", f"model.name={name}", f"model.weights={weights}",
                      f"model.config={config}", "dataset=synthetic")  # fmt: skip
    datamodule = validate(cfg).settings.datamodule
    assert datamodule.image_size == 32 and list(datamodule.mean) == [0.5, 0.5, 0.5]  # timm's pretrained cfg
    node = OmegaConf.to_container(cfg.model)
    torch.manual_seed(2)
    optim = OmegaConf.to_container(cfg.optim)
    model = ViTClassifier(node, {"ratio": 0.3}, optim, 10, class_names=list(datamodule.class_names))
    net, plain = model.net.state_dict(), source.state_dict()
    encoder = [k for k in plain if not k.startswith("head.")]
    assert encoder and all(torch.equal(net[k], plain[k]) for k in encoder)
    assert net["head.weight"].shape == (10, 32) and model.net.pretrained_cfg["label_names"][0] == "class_0"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)

    wrong = tmp_path / "other.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(ConfigError, match=r"model\.weights=.*cannot be loaded into model\.name"):
        FAMILIES["timm"].build({**node, "weights": str(wrong)}, 10)


HF_TINY = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


@pytest.mark.parametrize("family", ["hf_deit", "hf_dinov2"])
def test_hf_checkpoints_of_each_family_load_with_a_fresh_head(tmp_path, family):
    """A saved 1000-class DeiT (both heads) / DINOv2 (SwiGLU) checkpoint: encoder loaded, heads new."""
    hf = FAMILIES[family]
    extra = {"with_teacher": True} if family == "hf_deit" else {}
    arch = {"intermediate_size": 64} if family == "hf_deit" else {"use_swiglu_ffn": True}
    torch.manual_seed(0)
    hf.build(
        {"family": family, "name_or_path": None, "config": {**HF_TINY, **arch}, **extra}, 1000
    ).save_pretrained(tmp_path)
    node = {
        "family": family,
        "name_or_path": str(tmp_path),
        "attn_implementation": "eager",
        "config": None,
        **extra,
    }
    assert (
        hf.inputs(node).image_size == 32 and hf.meta_architecture(node, 5).tokens() == 16 + hf.prefix_tokens
    )
    saved = hf.build(node, 1000).state_dict()  # the checkpoint as it is
    net = hf.build(node, 5)
    heads = hf.head_prefixes(net)
    encoder = [k for k in saved if not k.startswith(heads)]
    assert all(torch.equal(net.state_dict()[k], saved[k]) for k in encoder)
    assert [net.state_dict()[f"{h}weight"].shape[0] for h in heads] == [5] * len(heads)
    if family == "hf_dinov2":  # read only by masked pre-training: no gradient in a classifier
        assert not net.dinov2.embeddings.mask_token.requires_grad
        assert "dinov2.embeddings.mask_token" not in dict(measured_parameters(net))


def test_keys_a_family_reads_may_be_added_on_the_command_line(compose_cfg):
    added = ["+model.with_teacher=true", "+model.config.hidden_dropout_prob=0.1"]
    check_added_keys(compose_cfg("model.family=hf_deit", *added), added)
    with pytest.raises(ConfigError, match=r"vitcrs reads no key 'model\.with_teacher'"):  # not a ViT key
        check_added_keys(compose_cfg(added[0]), added[:1])


@needs_timm
def test_timm_keys_may_be_added_on_the_command_line(compose_cfg):
    added = ["+model.weights=/some/file.safetensors", "+model.config.reg_tokens=4"]
    check_added_keys(compose_cfg("model=timm_micro", *added), added)


# --- bad model nodes ----------------------------------------------------------------------------------------

BAD_MODELS = [
    (["model.family=keras"], r"model\.family='keras' is unknown"),
    (["model=timm_micro", "model.name=no_such_model"], r"model\.name='no_such_model' is not a timm model"),
    (["model=timm_micro", "model.attn_implementation=flash_attention_2"], r"model\.attn_implementation"),
    (["model=timm_micro", "+model.weights=/no/such.safetensors"], r"model\.weights=.*pretrained=false"),
    (["model=timm_vit", "model.weights=/no/such.safetensors"], r"model\.weights=.*no such file"),
    (["model=timm_micro", "+model.config.num_classes=3"], r"num_classes"),
    (["model=timm_micro", "+model.config.depthh=3"], r"model\.config"),
    (["model=timm_micro", "model.config.num_heads=3"], r"model\.config=.*refuses it"),  # 64 / 3
    (["model=dinov2_micro", "model.config.mlp_ratio=2.5"], r"model\.config is invalid for Dinov2Config"),
    (["model=deit_micro", "model.with_teacher=maybe"], r"model\.with_teacher"),
    (["model=vit_micro", "+model.with_teacher=true"], r"with_teacher.*model\.family=hf_vit"),
]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [pytest.param(o, m, id=" ".join(o), marks=[needs_timm] if "timm" in o[0] else []) for o, m in BAD_MODELS],
)
def test_a_bad_model_node_is_a_config_error_naming_the_key(compose_cfg, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_cfg("dataset=synthetic", *overrides))
    assert not (tmp_path / "run").exists()


def test_without_timm_a_timm_model_says_how_to_install_it(compose_cfg, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError, as when not installed
    install = re.escape('pip install "vitcrs[timm]"')
    for model in ("timm_micro", "timm_vit"):
        with pytest.raises(ConfigError, match=install):
            validate(compose_cfg("dataset=synthetic", f"model={model}"))
    assert bench.main(["--model", "timm_micro", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert 'pip install "vitcrs[timm]"' in capsys.readouterr().err
    validate(compose_cfg("dataset=synthetic", "model=deit_micro"))  # the other families need no timm


# --- the fidelity meter and the bench on a timm model -------------------------------------------------------


def test_parameter_kinds_and_blocks_of_every_family():
    assert [parameter_kind(f"blocks.1.{n}.weight") for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2",
                                                               "norm1", "ls1", "attn.q_norm")] == [
        "qkv", "attn_output", "fc1", "fc2", "layernorm", "layer_scale", "layernorm"
    ]  # fmt: skip
    assert (
        parameter_kind("blocks.0.ls2.gamma") == "layer_scale" and parameter_block("blocks.7.ls2.gamma") == "7"
    )
    for name in (
        "cls_token",
        "reg_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "deit.embeddings.cls_token",
    ):
        assert (parameter_kind(name), parameter_block(name)) == ("embeddings", "embeddings"), name
    assert (parameter_kind("norm.weight"), parameter_block("norm.weight")) == ("layernorm", "final norm")
    layer = "dinov2.encoder.layer.3."
    assert parameter_block(f"{layer}mlp.gate_proj.weight") == "3"
    assert [parameter_kind(f"{layer}{n}") for n in ("mlp.gate_proj.weight", "mlp.up_proj.bias",
                                                    "mlp.down_proj.weight", "layer_scale1.lambda1",
                                                    "norm2.bias", "attention.o_proj.weight")] == [
        "fc1", "fc1", "fc2", "layer_scale", "layernorm", "attn_output"
    ]  # fmt: skip
    assert parameter_block("deit.layers.2.attention.q_proj.weight") == "2"


@needs_timm
def test_fidelity_meter_on_a_timm_model():
    torch.manual_seed(0)
    model = FAMILIES["timm"].build(timm_node(init_values=0.5), 4)
    assert {n.split(".")[0] for n, _ in measured_parameters(model)} >= {"blocks", "cls_token"}
    assert not [n for n, _ in measured_parameters(model) if n.startswith("head.")]
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(2)
    ]
    configs = [
        Configuration("wta_crs", ("lean_block",), 1.0),
        Configuration("crs", ("query", "key", "value", "scores", "context"), 0.3),
    ]
    results = measure(model, batches, configs, draws=3, prime_passes=0, seed=0)
    exact, sampled = results["configurations"]
    assert exact["rel_err"]["mean"] == 0.0
    assert sampled["rel_err"]["mean"] > 0.0 and set(sampled["per_block"]) == {
        "embeddings",
        "0",
        "1",
        "final norm",
    }
    assert {"qkv", "attn_output", "fc1", "fc2", "layernorm", "layer_scale", "embeddings"} == set(
        results["kinds"]
    )
    assert sampled["per_kind"]["qkv"]["mean"] > 0.0  # the fused q/k/v weight gets the sampled error


@needs_timm
def test_bench_on_a_timm_micro_model(tmp_path):
    args = ["--model", "timm_micro", "--layers", "1", "--batch-size", "2", "--device", "cpu", "--attn",
            "eager", "--precision", "fp32", "--ratios", "0.3", "--targets", "lean_block,linears",
            "--checkpointing", "off,on", "--out", str(tmp_path)]  # fmt: skip
    assert bench.main(args) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    meta, rows = result["meta"]["model"], {r["name"]: r for r in result["rows"]}
    assert (meta["family"], meta["tokens"], meta["layers"], meta["weights"]) == ("timm", 65, 1, None)
    assert meta["unmodelled"] == ["layer scale"]
    assert rows["eager/fp32/exact"]["status"] == "ok" and rows["eager/fp32/exact"]["saved_reduction"] == 1.0
    for name in ("eager/fp32/wta_crs@0.3/lean_block", "eager/fp32/wta_crs@0.3/linears"):
        assert rows[name]["status"] == "ok" and rows[name]["saved_reduction"] > 1.0, name
    checkpointed = [r for r in rows.values() if r["checkpointing"]]
    assert checkpointed and all(
        r["status"] == "skipped" and "Hugging Face" in r["reason"] for r in checkpointed
    )
    assert "- model: timm, hidden 64, 1 layers" in (tmp_path / "bench.md").read_text()


@needs_timm
def test_crs_config_check_sampled_reads_a_family_architecture(compose_cfg):
    """CRSConfig.check_sampled takes the family's Architecture in place of a ViTConfig."""
    arch = FAMILIES["timm"].meta_architecture(timm_node(), 10)
    CRSConfig(ratio=0.3).check_sampled(arch, 32, 4)
    with pytest.raises(ConfigError, match=r"crs\.min_k"):
        CRSConfig(ratio=0.3, min_k=4 * 17).check_sampled(arch, 32, 4)
