"""CRS on every supported ViT family (HF ViT, HF DeiT with both heads, HF DINOv2 with an MLP and a SwiGLU MLP,
timm VisionTransformer), at tiny random-init shapes with their regularisers on (dropout, drop path, layer
scale, qk-norm): exact forwards, exact gradients at ratio 1, unbiased sampled gradients, the lean block's
saved bytes, state_dict round trips, and the errors for what a family cannot do."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import timm
import torch
from torch import nn
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2ForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from vitcrs.crs import (
    TARGET_SETS,
    CRSBlock,
    CRSConfig,
    SamplingGenerator,
    SavedTensorsMeter,
    crs_state,
    find_blocks,
    inject,
    lean_block,
    vit_block_saved_bytes,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SIDE, PATCH, WIDTH, HEADS = 16, 4, 32, 4
HF = {"hidden_size": WIDTH, "num_hidden_layers": 2, "num_attention_heads": HEADS, "image_size": SIDE}
HF = {**HF, "patch_size": PATCH, "num_labels": 5}
TIMM = {"img_size": SIDE, "patch_size": PATCH, "embed_dim": WIDTH, "depth": 2, "num_heads": HEADS}
TIMM = {**TIMM, "num_classes": 5}


def _eager_timm(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "hf_vit": lambda: ViTForImageClassification(
        ViTConfig(
            **HF,
            intermediate_size=64,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
            attn_implementation="eager",
        )
    ),
    "hf_deit": lambda: DeiTForImageClassification(
        DeiTConfig(**HF, intermediate_size=64, hidden_dropout_prob=0.1, attn_implementation="sdpa")
    ),
    "hf_deit_teacher": lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**HF, intermediate_size=64)),
    "hf_dinov2": lambda: Dinov2ForImageClassification(
        Dinov2Config(**HF, mlp_ratio=2, drop_path_rate=0.2, layerscale_value=0.5, attn_implementation="eager")
    ),
    "hf_dinov2_swiglu": lambda: Dinov2ForImageClassification(
        Dinov2Config(**HF, mlp_ratio=2, drop_path_rate=0.2, layerscale_value=0.5, use_swiglu_ffn=True)
    ),
    "timm": lambda: _eager_timm(
        timm.create_model(
            "vit_tiny_patch16_224",
            **TIMM,
            drop_path_rate=0.2,
            init_values=0.5,
            qk_norm=True,
            attn_drop_rate=0.1,
        )
    ),
    "timm_avgpool_mlpdrop": lambda: timm.create_model(
        "vit_tiny_patch16_224",
        **TIMM,
        drop_path_rate=0.2,
        proj_drop_rate=0.1,
        global_pool="avg",
        class_token=False,
    ),
}
NAMES = list(FAMILIES)
EAGER = ["hf_vit", "hf_dinov2", "timm"]  # families built with eager attention (samplable matmuls)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[name]().train()


def logits(model: nn.Module, x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """The model's logits with torch's RNG (dropout, drop path) seeded."""
    torch.manual_seed(seed)
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def injected(base: nn.Module, ratio: float, targets=("lean_block",), seed: int = 5) -> nn.Module:
    """A copy of `base` with CRS, sampling from its own seeded stream (torch's RNG is left to the masks)."""
    return inject(
        copy.deepcopy(base), CRSConfig(ratio=ratio, targets=tuple(targets)), None, SamplingGenerator(seed)
    )


X = torch.randn(4, 3, SIDE, SIDE)


@pytest.mark.parametrize("name", NAMES)
def test_every_block_is_replaced_and_state_dict_keys_stay(name):
    base = build(name)
    model = injected(base, 0.3)
    assert len(find_blocks(base)) == 2
    assert sum(isinstance(m, CRSBlock) for m in model.modules()) == 2
    assert list(model.state_dict()) == list(base.state_dict())
    # an injected model's checkpoint loads into the plain model and back, strictly, with the same outputs
    plain = build(name)
    plain.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(plain.state_dict(), strict=True)
    model.eval(), plain.eval()
    assert torch.equal(logits(model, X), logits(plain, X))


@pytest.mark.parametrize("name", NAMES)
def test_forward_at_ratio_0_3_equals_the_plain_model(name):
    """fp32, same seed for dropout / drop path: the sampled forward is the plain one, to the bit."""
    base = build(name)
    ref = logits(base, X)
    sets = [("lean_block",), ("mlp",), TARGET_SETS["linears"]] + (
        [TARGET_SETS["study"]] if name in EAGER else []
    )
    for targets in sets:
        assert torch.equal(logits(injected(base, 0.3, targets), X), ref), targets


def _lean_even_at_ratio_one(self, *args, **kwargs):
    x, mask = self.adapter.hidden_states(args, kwargs)
    return lean_block(self, x, mask, keep_mid=not getattr(self, "keep_only_x", False))


@pytest.mark.parametrize("keep_only_x", [False, True], ids=["keep_x_x1", "keep_x"])
@pytest.mark.parametrize("name", NAMES)
def test_lean_block_at_ratio_one_gives_autograds_gradients(name, keep_only_x, monkeypatch):
    """The recomputation replays the forward's dropout and drop-path masks (else these grads would differ)."""
    monkeypatch.setattr(CRSBlock, "forward", _lean_even_at_ratio_one)
    base = build(name)
    model = injected(base, 1.0)
    for block in model.modules():
        if isinstance(block, CRSBlock):
            block.keep_only_x = keep_only_x
    logits(base, X).square().sum().backward()
    logits(model, X).square().sum().backward()
    for (pname, p), q in zip(base.named_parameters(), model.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), pname
            continue
        # the k projection's bias gets zero gradient (softmax is shift-invariant): rounding only
        atol = 1e-5 * p.grad.abs().max().item() + (1e-6 if "k_proj.bias" not in pname else 1e-5)
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=atol, msg=pname)


def _flat_grads(model: nn.Module, names: list[str]) -> torch.Tensor:
    params = dict(model.named_parameters())
    loss = (logits(model, X, seed=3) * torch.linspace(-1, 1, 5)).sum()  # same masks at every draw
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [params[n] for n in names])]).double()


@pytest.mark.parametrize("name", ["hf_vit", "hf_dinov2_swiglu", "timm"])
def test_lean_block_gradients_are_unbiased_with_regularisers_on(name):
    """The mean of many sampled gradients (ratio 0.3, drop path / dropout on, the same masks each draw)
    converges to the exact gradient of the first block's linears."""
    base = build(name)
    model = injected(base, 0.3)
    block = next(m for m in model.modules() if isinstance(m, CRSBlock))
    prefix = next(n for n, m in model.named_modules() if m is block)
    names = [f"{prefix}.{n}" for n, p in block.named_parameters() if p.dim() == 2]
    exact = _flat_grads(base, names)
    draws = torch.stack([_flat_grads(model, names) for _ in range(400)])
    se = draws.std(0) / math.sqrt(draws.shape[0])
    worst = ((draws.mean(0) - exact).abs() / (5.5 * se + 1e-6 * exact.abs().max())).max().item()
    assert worst <= 1.0, f"estimate off by {worst:.2f} x the 5.5-sigma tolerance"
    assert (draws[0] - exact).abs().max() > 0  # sampled, not exact


@pytest.mark.parametrize("name", NAMES)
def test_lean_block_keeps_the_residual_stream_only(name):
    """Saved bytes at ratio 0.3: each block keeps x and x1 (2 fp32 [batch, tokens, d] tensors), as the
    analytic model says, and the whole model at least 2.5x less than the plain model."""
    base = build(name)
    model = injected(base, 0.3)
    with SavedTensorsMeter(exclude=base.parameters()) as plain:
        out = logits(base, X)
    with SavedTensorsMeter(exclude=model.parameters()) as lean:
        out = logits(model, X)
    del out
    assert plain.bytes / lean.bytes >= 2.5, (plain.bytes, lean.bytes)
    block = next(m for m in model.modules() if isinstance(m, CRSBlock))
    h = torch.randn(4, 17, WIDTH, requires_grad=True)
    with SavedTensorsMeter(exclude=model.parameters()) as one:
        y = block(h)
    del y
    analytic = vit_block_saved_bytes(4, h.shape[1], WIDTH, HEADS, 64, CRSConfig(ratio=0.3), ["lean_block"])
    norms = 0 if block.parts.gated else h[..., 0].numel() * 4  # the MLP activation's row norms (not gated)
    assert one.bytes == 2 * h.numel() * 4 + norms  # x and x1
    if not block.parts.gated:  # (the analytic model is a plain ViT block's)
        assert one.bytes == analytic


def test_families_refuse_what_they_cannot_sample():
    with pytest.raises(ValueError, match=r"fused linear \(qkv\).*query, key and value together"):
        inject(build("timm"), CRSConfig(ratio=0.3, targets=("query",)))
    fused = timm.create_model("vit_tiny_patch16_224", **TIMM)  # timm's default: fused attention (sdpa)
    with pytest.raises(ValueError, match=r"\['context', 'scores'\].*fused attention.*fused_attn = False"):
        inject(fused, CRSConfig(ratio=0.3, targets=TARGET_SETS["study"]))
    with pytest.raises(ValueError, match=r"model.attn_implementation=eager"):
        inject(build("hf_dinov2_swiglu"), CRSConfig(ratio=0.3, targets=("scores",)))  # sdpa by default


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(x)


def test_an_unknown_block_class_is_named_with_how_to_add_an_adapter():
    model = nn.Sequential(_Block(), _Block(), _Block())
    with pytest.raises(
        ValueError, match=r"its repeated blocks are .*test_families\._Block.*write an adapter"
    ):
        inject(model, CRSConfig(ratio=0.3))


def test_a_plain_module_holding_a_vit_is_injected_and_its_state_found():
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = build("timm")

        def forward(self, x):
            return self.backbone(x)

    model = inject(Classifier(), CRSConfig(ratio=0.3))
    state = crs_state(model)
    assert state is not None and state.block_names == ["backbone.blocks.0", "backbone.blocks.1"]
    logits(model, X).sum().backward()
    assert all(p.grad is not None for p in model.backbone.blocks.parameters())


def test_inject_logs_what_it_replaced(caplog):
    with caplog.at_level("INFO", logger="vitcrs.crs.inject"):
        inject(build("hf_dinov2"), CRSConfig(ratio=0.3))
    assert "2 Hugging Face DINOv2 blocks (dinov2.encoder.layer.0 ... dinov2.encoder.layer.1)" in caplog.text
    assert "lean_block at ratio 0.3" in caplog.text
