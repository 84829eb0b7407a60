"""vitcrs.crs: exact forwards, unbiased sampled gradients, saved-for-backward bytes, ViT injection."""

from __future__ import annotations

import copy
import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

from support.montecarlo import (
    assert_same_estimate,
    assert_unbiased,
    linear_rows,
    match_linear_draws,
    record_draws,
    weight_estimates,
)
from vitcrs.crs import (
    ALL_TARGETS,
    LINEAR_TARGETS,
    TARGET_SETS,
    CRSBlock,
    CRSConfig,
    GradNormEMA,
    SampleGradCache,
    SamplingGenerator,
    SavedTensorsMeter,
    attach_sample_cache,
    crs_linear,
    crs_matmul,
    crs_state,
    grad_norm_sources,
    inject,
    lean_mlp,
    sample_caches,
    training_batch,
    uninjected,
    vit_block_saved_bytes,
)
from vitcrs.crs import functional as crs_functional
from vitcrs.crs import lean as crs_lean

LEAN_ALL = ("query", "key", "value", "attn_output", "mlp", "scores", "context")
METHODS = ["crs", "wta_crs"]


pytestmark = pytest.mark.usefixtures("fresh_crs_stream")


def skewed(*shape: int, device: str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """Random rows whose norms span orders of magnitude (where WTA-CRS matters)."""
    x = torch.randn(*shape, device=device)
    return (x * torch.exp(2 * torch.randn(*shape[:-1], 1, device=device))).to(dtype)


def tiny_vit(attn: str = "eager", layers: int = 1, labels: int = 5) -> ViTForImageClassification:
    cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=4, num_labels=labels, attn_implementation=attn,
    )  # fmt: skip
    return ViTForImageClassification(cfg)


# ---------------------------------------------------------------- forward is exact
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 5), (3, 11, 8), (2, 3, 9, 4)])
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.3])
def test_crs_linear_forward_equals_torch(device, dtype, shape, ratio):
    x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(6, shape[-1], device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(6, device=device, dtype=dtype, requires_grad=True)
    for method in METHODS:
        y = crs_linear(x, w, b, CRSConfig(ratio=ratio, method=method))
        assert torch.equal(y, F.linear(x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shapes", [((5, 7), (7, 3)), ((2, 6, 4), (2, 4, 9)), ((2, 3, 8, 5), (2, 3, 5, 8))])
def test_crs_matmul_forward_equals_torch(device, dtype, shapes):
    a = torch.randn(*shapes[0], device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(*shapes[1], device=device, dtype=dtype, requires_grad=True)
    for ratio in (1.0, 0.5, 0.3):
        for method in METHODS:
            assert torch.equal(crs_matmul(a, b, CRSConfig(ratio=ratio, method=method)), a @ b)


def test_forward_exact_under_autocast_and_grad_dtypes(device):
    x = torch.randn(4, 10, 16, device=device, requires_grad=True)
    lin = torch.nn.Linear(16, 8).to(device)
    q = torch.randn(2, 2, 10, 4, device=device, requires_grad=True)
    k = torch.randn(2, 2, 4, 10, device=device, requires_grad=True)
    block = inject(tiny_vit(), CRSConfig(ratio=0.3), ["mlp"]).to(device).vit.layers[0]
    h = torch.randn(4, 10, 32, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = crs_linear(x, lin.weight, lin.bias, CRSConfig(ratio=0.3))
        z = crs_matmul(q, k, CRSConfig(ratio=0.3))
        m = lean_mlp(block, h)
        assert torch.equal(y, lin(x)) and torch.equal(z, q @ k)
        assert torch.equal(m, block.mlp(block.layernorm_after(h)))
    (y.float().sum() + z.float().sum() + m.float().sum()).backward()
    assert x.grad.dtype == lin.weight.grad.dtype == q.grad.dtype == k.grad.dtype == torch.float32
    assert h.grad.dtype == block.mlp.fc1.weight.grad.dtype == block.layernorm_after.weight.grad.dtype


# ---------------------------------------------------------------- ratio 1 is torch
def test_ratio_one_gives_torch_gradients_exactly():
    x = torch.randn(3, 9, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    g = torch.randn(3, 9, 5)
    grads = torch.autograd.grad((crs_linear(x, w, b, CRSConfig(ratio=1.0)) * g).sum(), (x, w, b))
    ref = torch.autograd.grad((F.linear(x, w, b) * g).sum(), (x, w, b))
    assert all(torch.equal(u, v) for u, v in zip(grads, ref, strict=True))
    a, c = torch.randn(2, 6, 4, requires_grad=True), torch.randn(2, 4, 7, requires_grad=True)
    g = torch.randn(2, 6, 7)
    grads = torch.autograd.grad((crs_matmul(a, c, CRSConfig(ratio=1.0)) * g).sum(), (a, c))
    ref = torch.autograd.grad(((a @ c) * g).sum(), (a, c))
    assert all(torch.equal(u, v) for u, v in zip(grads, ref, strict=True))


@pytest.mark.parametrize("targets", [ALL_TARGETS, LEAN_ALL])
def test_injected_model_at_ratio_one_matches_plain_model(targets):
    base = tiny_vit()
    model = inject(copy.deepcopy(base), CRSConfig(ratio=1.0), targets)
    x = torch.randn(4, 3, 16, 16)
    ref, out = base(x).logits, model(x).logits
    assert torch.equal(ref, out)
    ref.square().sum().backward()
    out.square().sum().backward()
    for p, q in zip(base.parameters(), model.parameters(), strict=True):
        if "mlp" in targets:  # the lean MLP's chunked backward sums in another order
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(p.grad, q.grad)


# ---------------------------------------------------------------- unbiased, lower variance
# (tests/support/montecarlo.py: the op's gradient is Σ c_i g_iᵀ x_i for the draw it made, and thousands of
# draws of c from the same probabilities are made in one batched call)
DRAWS = 20_000


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("prob", ["norm", "norm_grad"])
def test_crs_linear_weight_gradient_is_unbiased(method, prob, monkeypatch):
    x = skewed(4, 10, 6).requires_grad_()
    w = torch.randn(5, 6, requires_grad=True)
    g = torch.randn(4, 10, 5)
    cfg = CRSConfig(ratio=0.3, method=method, prob=prob)
    grad_norm = GradNormEMA(0.5)
    exact = torch.autograd.grad((F.linear(x, w) * g).sum(), w)[0]

    def grad() -> torch.Tensor:
        return torch.autograd.grad((crs_linear(x, w, None, cfg, grad_norm) * g).sum(), w)[0]

    for _ in range(3):  # norm_grad: its running estimate learns from these
        grad()
    draws = record_draws(monkeypatch, crs_functional)
    sampled = grad()
    (draw,) = draws
    rows, grads = x.detach().reshape(-1, 6), g.reshape(-1, 5)
    assert_same_estimate(sampled, weight_estimates(draw.row_weights(), grads, rows))
    norms = rows.norm(dim=-1)
    by_norm = torch.allclose(draw.weights / draw.weights.sum(), norms / norms.sum())
    assert by_norm == (prob == "norm")  # norm_grad draws with its estimate once it has one
    assert_unbiased(weight_estimates(draw.redraw(DRAWS), grads, rows), exact)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_lean_mlp_gradients_are_unbiased_and_exact_at_ratio_one(method, monkeypatch):
    """The `mlp` target (`lean_mlp`: LayerNorm + MLP keeping only its input): forward exact, grads of the
    input, the norm and the biases exact, the two weight grads unbiased."""
    x = skewed(3, 8, 32).requires_grad_()
    g = torch.randn(3, 8, 32)
    model = inject(tiny_vit(), CRSConfig(ratio=1.0), ["mlp"])
    block = model.vit.layers[0]
    with torch.no_grad():
        block.layernorm_after.weight.normal_(), block.layernorm_after.bias.normal_()
    norm, fc1, fc2 = block.layernorm_after, block.mlp.fc1, block.mlp.fc2
    params = (x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, norm.weight, norm.bias)

    def grads(ratio: float) -> tuple[torch.Tensor, ...]:
        crs_state(model).config = CRSConfig(ratio=ratio, method=method, targets=("mlp",))
        y = lean_mlp(block, x)
        assert torch.equal(y, block.mlp(norm(x)))  # forward exact
        return torch.autograd.grad((y * g).sum(), params)

    exact = torch.autograd.grad((block.mlp(norm(x)) * g).sum(), params)
    for u, v in zip(grads(1.0), exact, strict=True):  # exact; the chunked backward sums in another order
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    rows = linear_rows(block.mlp, lambda: (block.mlp(norm(x)) * g).sum())
    draws = record_draws(monkeypatch, crs_lean)
    sampled = grads(0.3)
    for i in (0, 2, 4, 5, 6):  # grads of x, the biases and the norm stay exact
        torch.testing.assert_close(sampled[i], exact[i])
    matched = match_linear_draws(draws, rows)
    assert [names for _, names in matched] == [["fc2"], ["fc1"]]  # fc2's gradient is drawn first
    for draw, (name,) in matched:
        x_rows, g_rows = rows[name]
        i = 1 if name == "fc1" else 3
        assert_same_estimate(sampled[i], weight_estimates(draw.row_weights(), g_rows, x_rows))
        assert_unbiased(weight_estimates(draw.redraw(DRAWS), g_rows, x_rows), exact[i])


@pytest.mark.parametrize("method", METHODS)
def test_crs_matmul_gradients_are_unbiased(method):
    """The op samples each leading slice on its own: 3,000 stacked copies of one product are 3,000 draws."""
    a = skewed(2, 3, 12, 5)
    b = skewed(2, 3, 10, 5).transpose(-1, -2)  # non-contiguous, skewed columns
    g = torch.randn(2, 3, 12, 10)
    cfg = CRSConfig(ratio=0.3, method=method)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    exact = torch.autograd.grad(((a1 @ b1) * g).sum(), (a1, b1))
    copies = 3000
    a_d = a.expand(copies, *a.shape).clone().requires_grad_()
    b_d = b.expand(copies, *b.shape).transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    grad_a, grad_b = torch.autograd.grad((crs_matmul(a_d, b_d, cfg) * g).sum(), (a_d, b_d))
    assert_unbiased(grad_a, exact[0])
    assert_unbiased(grad_b, exact[1])


def test_sampled_gradients_are_stochastic_and_input_gradients_exact():
    x = torch.randn(4, 10, 6, requires_grad=True)
    w = torch.randn(5, 6, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    g = torch.randn(4, 10, 5)
    cfg = CRSConfig(ratio=0.3)
    gx1, gw1, gb1 = torch.autograd.grad((crs_linear(x, w, b, cfg) * g).sum(), (x, w, b))
    gx2, gw2, gb2 = torch.autograd.grad((crs_linear(x, w, b, cfg) * g).sum(), (x, w, b))
    rx, _, rb = torch.autograd.grad((F.linear(x, w, b) * g).sum(), (x, w, b))
    assert not torch.equal(gw1, gw2)  # a fresh sample each step
    torch.testing.assert_close(gx1, rx)
    torch.testing.assert_close(gb1, rb)
    assert torch.equal(gx1, gx2) and torch.equal(gb1, gb2)


def test_wta_crs_has_lower_variance_than_crs_on_skewed_rows(monkeypatch):
    x = skewed(8, 16, 6).requires_grad_()
    w = torch.randn(5, 6, requires_grad=True)
    g = torch.randn(8, 16, 5)
    draws = record_draws(monkeypatch, crs_functional)
    torch.autograd.grad((crs_linear(x, w, None, CRSConfig(ratio=0.3)) * g).sum(), w)
    (draw,) = draws  # the op's probabilities (p ∝ ‖x_i‖) and k: both methods draw from them
    rows, grads = x.detach().reshape(-1, 6), g.reshape(-1, 5)
    var = {m: weight_estimates(draw.redraw(DRAWS, m), grads, rows).var(0).sum().item() for m in METHODS}
    assert var["wta_crs"] < 0.8 * var["crs"], var


# ---------------------------------------------------------------- degenerate inputs
@pytest.mark.parametrize("method", METHODS)
def test_zero_inputs_give_finite_gradients(method):
    cfg = CRSConfig(ratio=0.3, method=method)
    x = torch.zeros(3, 10, 6, requires_grad=True)
    x_rows = torch.randn(3, 10, 6)
    x_rows[:, 2:] = 0  # most rows zero: fewer non-zero rows than samples
    w = torch.randn(5, 6, requires_grad=True)
    for inp in (x, x_rows.requires_grad_()):
        gx, gw = torch.autograd.grad(crs_linear(inp, w, None, cfg).sum(), (inp, w))
        assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    gw = torch.autograd.grad(crs_linear(x, w, None, cfg).sum(), w)[0]
    assert torch.equal(gw, torch.zeros_like(gw))
    a = torch.zeros(2, 7, 4, requires_grad=True)
    b = torch.zeros(2, 4, 9, requires_grad=True)
    for t in torch.autograd.grad(crs_matmul(a, b, cfg).sum(), (a, b)):
        assert torch.isfinite(t).all() and not t.any()


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"crs\.ratio"):
        CRSConfig(ratio=0.0)
    with pytest.raises(ValueError, match=r"crs\.ratio"):
        CRSConfig(ratio="half")
    with pytest.raises(ValueError, match=r"crs\.method"):
        CRSConfig(method="topk")
    with pytest.raises(ValueError, match=r"crs\.targets.*unknown.*'attention'"):
        inject(tiny_vit(), CRSConfig(ratio=0.5), ["query", "attention"])
    with pytest.raises(ValueError, match=r"model\.attn_implementation=eager"):
        inject(tiny_vit(attn="sdpa"), CRSConfig(ratio=0.5), TARGET_SETS["study"])
    with pytest.raises(ValueError, match=r"'mlp' together with 'fc1'"):
        inject(tiny_vit(), CRSConfig(ratio=0.5), ["mlp", "fc1"])
    inject(tiny_vit(attn="sdpa"), CRSConfig(ratio=0.5), LINEAR_TARGETS)  # linears are fine with sdpa


def test_seeded_stream_is_reproducible_and_restorable():
    x = torch.randn(4, 10, 6, requires_grad=True)
    w = torch.randn(5, 6, requires_grad=True)
    cfg = CRSConfig(ratio=0.3)

    stream = SamplingGenerator()

    def grad() -> torch.Tensor:
        y = crs_linear(x, w, None, cfg, generator=stream.for_device(x.device))
        return torch.autograd.grad(y.square().sum(), w)[0]

    stream.manual_seed(7)
    first = grad()
    state = stream.get_state()
    second = grad()
    stream.manual_seed(7)
    assert torch.equal(grad(), first)
    stream.set_state(state)
    assert torch.equal(grad(), second)
    stream.manual_seed(8)
    assert not torch.equal(grad(), first)
    # a state saved on another device type only (a GPU checkpoint on a CPU machine): a fresh stream, warned
    stream.set_state({"seed": 7, "states": {"cuda:3": state["states"]["cpu"]}})
    with pytest.warns(UserWarning, match="saved on cuda, not cpu: .* fresh stream from seed 7"):
        assert torch.equal(grad(), first)


# ---------------------------------------------------------------- memory
def _saved(fn, params) -> int:
    with SavedTensorsMeter(exclude=params) as meter:
        out = fn()
    del out
    return meter.bytes


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_crs_linear_saves_only_sampled_rows(autocast, ratio):
    x = torch.randn(8, 50, 64, requires_grad=True)
    lin = torch.nn.Linear(64, 32)
    cfg = CRSConfig(ratio=ratio)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        exact = _saved(lambda: lin(x), [lin.weight, lin.bias])
        sampled = _saved(lambda: crs_linear(x, lin.weight, lin.bias, cfg), [lin.weight, lin.bias])
    n, k = 400, cfg.num_samples(400)
    elem = 2 if autocast else 4
    x_bytes = n * 64 * elem
    assert exact >= x_bytes  # exact keeps all of x (and, under autocast, a weight cast)
    assert sampled == k * 64 * elem + k * 4  # k rows in the compute dtype + int32 indices, nothing else
    assert sampled <= ratio * x_bytes + 64 * elem + k * 4


@pytest.mark.parametrize("autocast", [False, True])
def test_crs_matmul_saves_only_sampled_slices(autocast):
    q = torch.randn(4, 3, 50, 16, requires_grad=True)
    k = torch.randn(4, 3, 16, 50, requires_grad=True)
    cfg = CRSConfig(ratio=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        exact = _saved(lambda: q @ k, [])
        sampled = _saved(lambda: crs_matmul(q, k, cfg), [])
    kk = cfg.num_samples(50)
    elem = 2 if autocast else 4
    assert exact == 2 * 4 * 3 * 50 * 16 * elem
    assert sampled == 2 * 4 * 3 * kk * (16 * elem + 4)
    assert sampled <= 0.3 * exact + 2 * 4 * 3 * (16 * elem + kk * 4)


def _block_saved(model: ViTForImageClassification, batch: int, tokens: int, autocast: bool) -> int:
    h = torch.randn(batch, tokens, model.config.hidden_size, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return _saved(lambda: model.vit.layers[0](h), list(model.parameters()))


# (batch, tokens, width, heads, MLP width): a small block for every case, a ViT-B/16 block for one
SMALL_BLOCK = (4, 17, 64, 4, 256)
VIT_B_BLOCK = (2, 197, 768, 12, 3072)


def _block(shape: tuple[int, ...]) -> ViTForImageClassification:
    _, tokens, width, heads, mlp = shape
    side = 16 * math.isqrt(tokens - 1)  # patches of 16 px, plus [CLS]
    config = ViTConfig(hidden_size=width, num_attention_heads=heads, intermediate_size=mlp, image_size=side,
                       num_hidden_layers=1, num_labels=10, attn_implementation="eager")  # fmt: skip
    return ViTForImageClassification(config)


@pytest.mark.parametrize(
    ("shape", "autocast", "ratios", "sets"),
    [
        (SMALL_BLOCK, False, (0.5, 0.3), ("study", "linears", "all", "lean_all")),
        (SMALL_BLOCK, True, (0.5, 0.3), ("study", "linears", "all", "lean_all")),
        (VIT_B_BLOCK, False, (0.3,), ("all", "lean_all")),
    ],
    ids=["small-fp32", "small-bf16", "vit_b16-fp32"],
)
def test_injected_block_saved_bytes_match_the_analytic_ideal(shape, autocast, ratios, sets):
    """Measured bytes of one block, exact and injected, equal `vit_block_saved_bytes` to the byte."""
    base = _block(shape)
    batch, tokens = shape[:2]
    exact = _block_saved(base, batch, tokens, autocast)
    assert exact == vit_block_saved_bytes(*shape, autocast=autocast)
    for ratio in ratios:
        cfg = CRSConfig(ratio=ratio)
        for name in sets:
            targets = TARGET_SETS[name]
            model = inject(copy.deepcopy(base), cfg, targets)
            measured = _block_saved(model, batch, tokens, autocast)
            assert measured == vit_block_saved_bytes(*shape, cfg, targets, autocast)
            assert measured < exact


def test_injected_block_memory_reduction_factors():
    """ViT-B/16 block, batch 64, fp32 at 0.3: all linears + matmuls ≥ 1.5x; with the lean MLP ≥ 2x."""
    shape = (64, 197, 768, 12, 3072)
    exact = vit_block_saved_bytes(*shape)
    full = vit_block_saved_bytes(*shape, CRSConfig(ratio=0.3), ALL_TARGETS)
    linears = vit_block_saved_bytes(*shape, CRSConfig(ratio=0.3), LINEAR_TARGETS)
    lean = vit_block_saved_bytes(*shape, CRSConfig(ratio=0.3), LEAN_ALL)
    assert exact / full > 1.5 and exact / linears > 1.3 and exact / lean > 2.0


# ---------------------------------------------------------------- injection
@pytest.mark.parametrize(
    "targets",
    [
        TARGET_SETS["study"],
        LINEAR_TARGETS,
        ALL_TARGETS,
        LEAN_ALL,
        ("fc1", "fc2"),
        ("query",),
        ("scores",),
        ("mlp",),
    ],
)
def test_inject_replaces_the_blocks_and_keeps_state_dict(targets):
    base = tiny_vit(layers=2)
    model = inject(copy.deepcopy(base), CRSConfig(ratio=0.5), targets)
    assert list(model.state_dict()) == list(base.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in base.named_parameters()]
    assert all(isinstance(layer, CRSBlock) for layer in model.vit.layers)
    children = zip(model.vit.layers[0].children(), base.vit.layers[0].children(), strict=True)
    assert all(type(m) is type(b) for m, b in children)
    state = crs_state(model)
    assert state.targets == tuple(t for t in state.targets if t in targets) and set(state.targets) == set(
        targets
    )
    ops = {"query": "qkv", "key": "qkv", "value": "qkv", "scores": "scores_m", "context": "context_n"}
    wanted = {ops.get(t, t) for t in targets if t != "mlp"}
    assert {k.rsplit(".", 1)[1] for k in grad_norm_sources(model)} >= wanted
    # injecting again replaces the settings, keeping the blocks' parameters
    again = inject(model, CRSConfig(ratio=0.3), ["lean_block"])
    assert crs_state(again).targets == ("lean_block",) and not grad_norm_sources(again)
    assert sum(isinstance(m, type(state)) for m in again.modules()) == 1
    assert list(again.state_dict()) == list(base.state_dict())


def test_uninjected_runs_the_plain_model_and_restores_crs():
    base = tiny_vit()
    model = inject(copy.deepcopy(base), CRSConfig(ratio=0.3), LEAN_ALL)
    x = torch.randn(2, 3, 16, 16)
    with uninjected(model):
        assert not crs_state(model).enabled
        with SavedTensorsMeter(exclude=model.parameters()) as exact:
            model(x)
    with SavedTensorsMeter(exclude=base.parameters()) as plain:
        base(x)
    assert exact.bytes == plain.bytes
    assert crs_state(model).enabled
    with SavedTensorsMeter(exclude=model.parameters()) as sampled:
        model(x)
    assert sampled.bytes < plain.bytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_trains_with_every_target(dtype):
    """A model held in bf16/fp16 (no autocast): same forward as the plain model, finite gradients."""
    base = tiny_vit().to(dtype)
    x = torch.randn(4, 3, 16, 16, dtype=dtype)
    for ratio in (1.0, 0.3):
        model = inject(copy.deepcopy(base), CRSConfig(ratio=ratio), LEAN_ALL)
        out = model(x).logits
        assert torch.equal(out, base(x).logits)
        out.float().square().sum().backward()
        assert all(torch.isfinite(p.grad).all() and p.grad.dtype == dtype for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_grad_norm_estimate_survives_a_device_change():
    ema = GradNormEMA(0.5)
    ema.update(torch.tensor([2.0, 4.0]))  # restored from a CPU checkpoint, then moved with its model
    ema.cuda()
    ema.update(torch.tensor([4.0, 8.0], device="cuda"))
    assert torch.equal(ema.estimate.cpu(), torch.tensor([3.0, 6.0]))  # moved and averaged, not reset


def test_estimates_move_with_the_model_and_the_cache_stays_in_host_memory(device):
    """The estimates are non-persistent buffers: `.to()` moves them (a dtype stands in for a device on a
    CPU machine), `state_dict` keeps the HF keys; the sample cache's entries stay in host memory."""
    for prob in ("norm_grad", "sample_cache"):
        model = inject(tiny_vit(layers=1), CRSConfig(ratio=0.5, prob=prob), ALL_TARGETS)
        attach_sample_cache(model, 2)
        with training_batch(model, torch.arange(2)):
            model(torch.randn(2, 3, 16, 16)).logits.sum().backward()
        sources = grad_norm_sources(model)
        assert len(sources) == 7 and all(s.estimate.numel() > 0 for s in sources.values())
        assert list(model.state_dict()) == list(tiny_vit(layers=1).state_dict())
        model.to(device, torch.float64)
        assert all(s.estimate.device.type == device.type for s in sources.values())
        assert all(s.estimate.dtype == torch.float64 for s in sources.values())
        for cache in sample_caches(model).values():
            assert isinstance(cache, SampleGradCache) and cache.entries.device.type == "cpu"
        assert len(sample_caches(model)) == (7 if prob == "sample_cache" else 0)


def test_injected_checkpoint_loads_into_plain_model(tmp_path):
    model = inject(tiny_vit(), CRSConfig(ratio=0.3), ALL_TARGETS)
    model.save_pretrained(tmp_path)
    plain = ViTForImageClassification.from_pretrained(tmp_path, attn_implementation="eager")
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(plain(x).logits, model(x).logits)


def test_training_step_of_injected_vit_reduces_loss():
    model = inject(tiny_vit(layers=2, labels=3), CRSConfig(ratio=0.3, prob="norm_grad"), ALL_TARGETS)
    x = torch.randn(16, 3, 16, 16)
    y = torch.arange(16) % 3
    x += y.view(-1, 1, 1, 1).float()  # learnable: class shifts the image
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    sources = grad_norm_sources(model)
    assert len(sources) == 2 * 7 and all(s.estimate.numel() > 0 for s in sources.values())
    fresh = inject(tiny_vit(layers=2, labels=3), CRSConfig(ratio=0.3, prob="norm_grad"), ALL_TARGETS)
    assert grad_norm_sources(fresh).keys() == sources.keys()


def test_gradient_checkpointing_with_crs_trains():
    model = inject(tiny_vit(layers=2), CRSConfig(ratio=0.5), ALL_TARGETS)
    model.activation_checkpointing_enable()
    model.train()
    loss = model(torch.randn(4, 3, 16, 16)).logits.square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_meter_does_not_keep_a_dropped_graph_alive():
    x = torch.randn(4, 100, requires_grad=True)
    with SavedTensorsMeter() as meter:
        y = x.softmax(-1)  # softmax saves its own output
        loss = y.square().sum()
    ref = weakref.ref(y)
    assert meter.bytes == y.numel() * 4  # y, saved by softmax and by square, counted once
    del y, loss
    gc.collect()
    assert ref() is None
