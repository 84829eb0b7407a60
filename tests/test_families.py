"""CRS on every supported ViT family (HF ViT, HF DeiT with both heads, HF DINOv2 with an MLP and a SwiGLU MLP,
timm VisionTransformer), at tiny random-init shapes with their regularisers on (dropout, drop path, layer
scale, qk-norm): exact forwards, exact gradients at ratio 1 and unbiased sampled gradients of every target
set the bench runs, in fp32 and bf16 autocast, on `--device` (the GPU check runs them on CUDA); the lean
block's saved bytes, state_dict round trips, and the errors for what a family cannot do."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable

import pytest
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

from support.montecarlo import (
    assert_same_estimate,
    assert_unbiased,
    bias_ratio,
    linear_rows,
    linear_weight_estimates,
    match_linear_draws,
    record_draws,
)
from vitcrs.bench.grid import BENCH_TARGET_SETS
from vitcrs.crs import (
    MATMUL_TARGETS,
    TARGET_SETS,
    CRSBlock,
    CRSConfig,
    SamplingGenerator,
    SavedTensorsMeter,
    crs_state,
    find_blocks,
    inject,
    lean_block,
    uninjected,
    vit_block_saved_bytes,
)
from vitcrs.crs import lean as crs_lean

# timm is an optional extra (pip install "vitcrs[timm]"; make install has it): its families need it
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason='pip install -e ".[timm]"')
SIDE, PATCH, WIDTH, HEADS = 16, 4, 32, 4
HF = {"hidden_size": WIDTH, "num_hidden_layers": 2, "num_attention_heads": HEADS, "image_size": SIDE}
HF = {**HF, "patch_size": PATCH, "num_labels": 5}
TIMM = {"img_size": SIDE, "patch_size": PATCH, "embed_dim": WIDTH, "depth": 2, "num_heads": HEADS}
TIMM = {**TIMM, "num_classes": 5}


def _timm(**kwargs) -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", **TIMM, **kwargs)


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
    "timm": lambda: _eager_timm(_timm(drop_path_rate=0.2, init_values=0.5, qk_norm=True, attn_drop_rate=0.1)),
    "timm_avgpool_mlpdrop": lambda: _timm(
        drop_path_rate=0.2, proj_drop_rate=0.1, global_pool="avg", class_token=False
    ),
}
NAMES = [pytest.param(n, marks=needs_timm) if n.startswith("timm") else n for n in FAMILIES]
EAGER = ["hf_vit", "hf_dinov2", "timm"]  # families built with eager attention (samplable matmuls)
# every (family, target set the bench runs) that can be sampled: the attention matmuls need eager attention
FAMILY_SETS = [
    pytest.param(n, s, marks=needs_timm) if n.startswith("timm") else (n, s)
    for n in FAMILIES
    for s in BENCH_TARGET_SETS
    if n in EAGER or not set(TARGET_SETS[s]) & set(MATMUL_TARGETS)
]
PRECISIONS = ["fp32", "bf16"]
BIAS_LIMIT = 6.0  # `bias_ratio` of the sampled gradients: about 1 when unbiased
# bf16 autocast: relative error of the logits, and of all gradients at ratio 1 (fp32: the same bits, 1e-5)
BF16_TOL = {"forward": 1e-2, "ratio_one": 2e-2}


def build(name: str, device: torch.device | str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[name]().train().to(device)


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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _step(model: nn.Module, x: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, every parameter's gradient flattened, float64) of one forward and backward, with the same
    dropout and drop-path masks at every call (torch's RNG seeded; CRS samples from its own stream)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = logits(model, x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1], device=x.device)).sum().backward()
    grads = [
        p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten() for p in model.parameters()
    ]
    return out.detach(), torch.cat(grads).double()


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("name", "target_set"), FAMILY_SETS)
def test_every_target_set_of_every_family_is_exact_forward_and_unbiased_backward(
    name, target_set, precision, device
):
    """On the device, in fp32 (to the bit on a CPU) and bf16 autocast (within rounding): the sampled model's
    forward at ratio 0.3 is the plain one, its gradients at ratio 1 are the plain ones, and its sampled
    gradients are finite and unbiased (fp32: the mean of 16 draws within Monte-Carlo error of the exact
    gradient, `bias_ratio`)."""
    base = build(name, device)
    targets = TARGET_SETS[target_set]
    x = X.to(device)
    ref_logits, exact = _step(base, x, precision)
    _, at_one = _step(injected(base, 1.0, targets), x, precision)
    sampled = injected(base, 0.3, targets)
    draws = [_step(sampled, x, precision) for _ in range(16 if precision == "fp32" else 2)]
    assert all(torch.isfinite(out).all() and torch.isfinite(g).all() for out, g in draws)
    if precision == "fp32":  # on the CPU to the bit; a GPU's kernels may round otherwise from call to call
        tol = 0.0 if device.type == "cpu" else 1e-5
        assert max(_rel(out, ref_logits) for out, _ in draws) <= tol
        assert _rel(at_one, exact) <= 1e-5
    else:
        assert max(_rel(out, ref_logits) for out, _ in draws) <= BF16_TOL["forward"]
        assert _rel(at_one, exact) <= BF16_TOL["ratio_one"]
        return
    g = torch.stack([d for _, d in draws])
    assert (g[0] - exact).abs().max() > 0  # sampled, not exact
    assert bias_ratio(g, exact) <= BIAS_LIMIT


def test_the_bias_ratio_passes_unbiased_draws_and_flags_a_wrong_scale():
    """256 draws with 50 % error each: unbiased passes (so do 16, as the test above takes), a 25 % scale error
    (a wrong 1/(k·p)) does not."""
    torch.manual_seed(0)
    exact = torch.randn(2000, dtype=torch.float64)

    def ratio(scale: float, count: int) -> float:
        return bias_ratio(scale * exact + 0.5 * torch.randn(count, 2000, dtype=torch.float64), exact)

    assert ratio(1.0, 256) < 2.0 < BIAS_LIMIT and ratio(1.0, 16) < 2.0
    assert ratio(1.25, 256) > 5 * BIAS_LIMIT


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


@pytest.mark.parametrize("name", NAMES)
def test_keeping_the_input_alone_gives_the_same_sampled_gradients(name):
    """crs.keep_mid=false (the memory floor) changes what is kept, not what is computed: at ratio 0.3, from
    the same sampling stream, it draws the same rows and gives the default's gradients (so the default's
    measured gradient error and accuracy hold for it)."""
    base = build(name)

    def lean(keep_mid: bool) -> nn.Module:
        cfg = CRSConfig(ratio=0.3, keep_mid=keep_mid)
        return inject(copy.deepcopy(base), cfg, None, SamplingGenerator(5))

    (out_mid, g_mid), (out_x, g_x) = _step(lean(True), X, "fp32"), _step(lean(False), X, "fp32")
    assert torch.equal(out_x, out_mid)
    _, exact = _step(base, X, "fp32")
    sizes = [p.numel() for p in base.parameters()]
    pairs = list(zip(g_mid.split(sizes), g_x.split(sizes), exact.split(sizes), strict=True))
    assert max(_rel(mid, ex) for mid, _, ex in pairs if ex.any()) > 1e-2  # sampled
    assert max(_rel(x, mid) for mid, x, _ in pairs if mid.any()) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_vit", "hf_dinov2_swiglu", pytest.param("timm", marks=needs_timm)])
def test_lean_block_gradients_are_unbiased_with_regularisers_on(name, monkeypatch):
    """Ratio 0.3, drop path / dropout on (the same masks in the plain pass and the sampled one): each linear's
    weight gradient is the estimate of the draw the lean block made (p ∝ ‖g_i‖·‖x_i‖, one draw per input:
    tests/support/montecarlo.py), and the mean of 2,000 draws anew is the exact gradient."""
    model = injected(build(name), 0.3)
    weights = torch.linspace(-1, 1, 5)
    with uninjected(model):  # the plain network: each linear's rows and the exact gradient
        rows = linear_rows(model, lambda: (logits(model, X, seed=3) * weights).sum())
    params = dict(model.named_parameters())
    exact = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    draws = record_draws(monkeypatch, crs_lean)
    (logits(model, X, seed=3) * weights).sum().backward()
    matched = match_linear_draws(draws, rows)
    assert len(matched) == 8  # per block: q/k/v (one input), the attention output, fc1, fc2
    estimates = linear_weight_estimates(matched, rows)
    for linear, estimate in estimates.items():
        assert_same_estimate(params[f"{linear}.weight"].grad, estimate)
    # sampled, not exact (the last block's MLP may be: only its [CLS] rows have gradients, WTA keeps them)
    assert max(_rel(params[f"{n}.weight"].grad, exact[f"{n}.weight"]) for n in estimates) > 1e-2
    redrawn = linear_weight_estimates(matched, rows, 2000)
    assert_unbiased(torch.cat([e.flatten(1) for e in redrawn.values()], 1),
                    torch.cat([exact[f"{n}.weight"].flatten() for n in redrawn]))  # fmt: skip


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


@needs_timm
def test_families_refuse_what_they_cannot_sample():
    with pytest.raises(ValueError, match=r"fused linear \(qkv\).*query, key and value together"):
        inject(build("timm"), CRSConfig(ratio=0.3, targets=("query",)))
    fused = _timm()  # timm's default: fused attention (sdpa)
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


@needs_timm
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
