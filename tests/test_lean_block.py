"""The lean block (`lean_block` target): exact forward, exact gradients at ratio 1, unbiased and
lower-variance sampled weight gradients, and saved-for-backward bytes equal to the analytic model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification
from transformers.models.vit.modeling_vit import ViTLayer

from support.montecarlo import (
    assert_same_estimate,
    assert_unbiased,
    linear_rows,
    linear_weight_estimates,
    match_linear_draws,
    record_draws,
)
from vitcrs.bench import BlockShape, analytic_block_saved_bytes
from vitcrs.crs import (
    LINEAR_TARGETS,
    CRSBlock,
    CRSConfig,
    SamplingBudget,
    SavedTensorsMeter,
    crs_state,
    inject,
    lean_block,
    uninjected,
    vit_block_saved_bytes,
)
from vitcrs.crs import functional as crs_functional
from vitcrs.crs import lean as crs_lean
from vitcrs.crs.lean import Sampler, _batch_chunks, mlp_backward

pytestmark = pytest.mark.usefixtures("fresh_crs_stream")
ATTNS = ["eager", "sdpa"]
WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")


def tiny_vit(attn: str, layers: int = 2, dropout: float = 0.0) -> ViTForImageClassification:
    cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=4, num_labels=5, attn_implementation=attn, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    return ViTForImageClassification(cfg)


def tiny_block(attn: str, hidden: int = 8, heads: int = 2) -> ViTLayer:
    cfg = ViTConfig(
        hidden_size=hidden, num_attention_heads=heads, intermediate_size=2 * hidden, attn_implementation=attn
    )
    layer = ViTLayer(cfg)
    with torch.no_grad():  # non-trivial LayerNorms, so their grads are checked too
        for norm in (layer.layernorm_before, layer.layernorm_after):
            norm.weight.normal_(1.0, 0.5), norm.bias.normal_()
    return layer


def lean(layer: ViTLayer, cfg: CRSConfig) -> CRSBlock:
    """`layer` as a lean block (injected in a one-block model)."""
    return inject(torch.nn.Sequential(layer), cfg, ["lean_block"])[0]


def skewed(*shape: int) -> torch.Tensor:
    """Random rows whose norms span orders of magnitude (where the choice of probabilities matters)."""
    return torch.randn(*shape) * torch.exp(1.5 * torch.randn(*shape[:-1], 1))


def block_weights(layer: ViTLayer) -> list[torch.Tensor]:
    mods = {
        **{n: getattr(layer.attention, n) for n in WEIGHTS[:4]},
        "fc1": layer.mlp.fc1,
        "fc2": layer.mlp.fc2,
    }
    return [mods[n].weight for n in WEIGHTS]


# ---------------------------------------------------------------- exact forward, exact grads at ratio 1
def _recompute_even_at_ratio_one(self, hidden_states, attention_mask=None, **kwargs):
    """CRSBlock.forward without its ratio-1 shortcut to the plain block: the lean op at every ratio."""
    return lean_block(
        self, hidden_states, attention_mask, not (self.gradient_checkpointing and self.training)
    )


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("attn", ATTNS)
def test_lean_block_forward_is_exact_and_ratio_one_gives_exact_gradients(
    attn, checkpointing, dropout, monkeypatch
):
    """With dropout on: the recomputation replays the forward's masks, so ratio 1 gives autograd's grads.
    Without it, eager attention is recomputed and backpropagated in batch chunks (`ATTENTION_CHUNKS`)."""
    monkeypatch.setattr(CRSBlock, "forward", _recompute_even_at_ratio_one)
    base = tiny_vit(attn, dropout=dropout).train()
    x = torch.randn(4, 3, 16, 16)
    for ratio in (1.0, 0.3):
        model = inject(copy.deepcopy(base), CRSConfig(ratio=ratio), ["lean_block"])
        crs_state(model).generator.manual_seed(0)  # sampling draws from its own stream, not torch's
        if checkpointing:  # the lean block replaces HF's checkpoint (it recomputes itself) and keeps only x
            model.activation_checkpointing_enable()
        assert all(isinstance(layer, CRSBlock) for layer in model.vit.layers)
        chunks = _batch_chunks(model.vit.layers[0], torch.empty(4, 17, 32))
        assert len(chunks) == (4 if attn == "eager" and not dropout else 1)
        torch.manual_seed(1)
        out = model(x).logits
        torch.manual_seed(1)
        ref = base(x).logits
        assert torch.equal(out, ref)
        if ratio < 1.0:
            continue
        torch.manual_seed(2)
        out.square().sum().backward()
        ref.square().sum().backward()
        for (name, p), q in zip(base.named_parameters(), model.parameters(), strict=True):
            # recomputation sums in another order; k_proj's bias grad is zero up to rounding (softmax shift)
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        base.zero_grad()


@pytest.mark.parametrize("attn", ATTNS)
def test_lean_block_under_bf16_autocast(attn, monkeypatch):
    monkeypatch.setattr(CRSBlock, "forward", _recompute_even_at_ratio_one)
    base = tiny_vit(attn).train()
    x = torch.randn(4, 3, 16, 16)
    exact = copy.deepcopy(base)
    model = inject(copy.deepcopy(base), CRSConfig(ratio=1.0), ["lean_block"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = model(x).logits, exact(x).logits
    assert torch.equal(out, ref)
    out.float().square().sum().backward()
    ref.float().square().sum().backward()
    for p, q in zip(exact.parameters(), model.parameters(), strict=True):
        assert q.grad.dtype == torch.float32
        scale = p.grad.abs().max().item() + 1e-3
        assert (q.grad - p.grad).abs().max().item() <= 0.05 * scale  # bf16 GEMMs in another order
    sampled = inject(copy.deepcopy(base), CRSConfig(ratio=0.3), ["lean_block"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sampled(x).logits.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32 for p in sampled.parameters())


def _lean_in_its_keep_dtype_even_at_ratio_one(self, hidden_states, attention_mask=None, **kwargs):
    return lean_block(self, hidden_states, attention_mask, True, self.crs.config.kept_dtype)


@pytest.mark.parametrize("attn", ATTNS)
def test_a_bfloat16_stream_halves_the_kept_bytes_and_rounds_the_gradients_slightly(attn, monkeypatch):
    """crs.keep_dtype=bfloat16: the same forward, half the residual-stream bytes kept, and (the lean op forced
    at ratio 1, so only the stream's rounding differs) autograd's gradients to within the rounding."""
    monkeypatch.setattr(CRSBlock, "forward", _lean_in_its_keep_dtype_even_at_ratio_one)
    base = tiny_vit(attn).train()
    x = torch.randn(4, 3, 16, 16)
    grads, kept = {}, {}
    for keep_dtype in (None, "bfloat16"):
        model = inject(copy.deepcopy(base), CRSConfig(ratio=1.0, keep_dtype=keep_dtype), ["lean_block"])
        with SavedTensorsMeter(exclude=model.parameters()) as meter:
            out = model(x).logits
        assert torch.equal(out, base(x).logits)
        out.square().sum().backward()
        kept[keep_dtype] = meter.bytes
        grads[keep_dtype] = torch.cat([p.grad.flatten() for p in model.parameters()])
    base(x).logits.square().sum().backward()
    exact = torch.cat([p.grad.flatten() for p in base.parameters()])
    n, d, blocks = 4 * 17, 32, 2
    assert kept[None] - kept["bfloat16"] == blocks * 2 * n * d * 2  # x and x1 of each block: 4 → 2 bytes
    assert torch.allclose(grads[None], exact, rtol=1e-4, atol=1e-6)
    err = ((grads["bfloat16"] - exact).norm() / exact.norm()).item()
    assert 1e-5 < err < 2e-3, err  # rounded (2⁻⁹ relative in the recomputed activations), and only that


def test_lean_block_settings_are_checked():
    with pytest.raises(ValueError, match=r"'lean_block' together with \['query'\]"):
        inject(tiny_vit("eager"), CRSConfig(ratio=0.5), ["lean_block", "query"])
    model = inject(tiny_vit("eager", dropout=0.1), CRSConfig(ratio=0.5), ["lean_block"])  # dropout: fine
    x = torch.randn(2, 3, 16, 16)
    with uninjected(model), SavedTensorsMeter(exclude=model.parameters()) as plain:
        model(x)
    with SavedTensorsMeter(exclude=model.parameters()) as lean_bytes:
        model(x)
    assert lean_bytes.bytes < plain.bytes


# ---------------------------------------------------------------- unbiased, lower variance than p ∝ ‖x‖
def _block_grads(layer: ViTLayer, x: torch.Tensor, g: torch.Tensor, cfg: CRSConfig | None):
    params = [p for p in layer.parameters() if p.requires_grad]
    y = layer(x) if cfg is None else lean_block(lean(layer, cfg), x)
    return torch.autograd.grad((y * g).sum(), [x, *params])


@pytest.mark.parametrize(("attn", "method"), [("eager", "crs"), ("sdpa", "wta_crs")])
def test_lean_block_weight_gradients_are_unbiased(attn, method, monkeypatch):
    """Every gradient but the six weights' is exact; each weight gradient is the estimate of the draw the
    block made (p ∝ ‖g_i‖·‖x_i‖, q/k/v sharing one: tests/support/montecarlo.py), and the mean of 20,000
    draws anew is the exact gradient."""
    layer = tiny_block(attn)
    x = skewed(3, 6, 8).requires_grad_()
    g = skewed(3, 6, 8)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    is_weight = [n.endswith(".weight") and ("proj" in n or "fc" in n) for n in names]
    assert sum(is_weight) == 6
    rows = linear_rows(layer, lambda: (layer(x) * g).sum())
    exact = _block_grads(layer, x, g, None)
    draws = record_draws(monkeypatch, crs_lean)
    sampled = _block_grads(layer, x, g, CRSConfig(ratio=0.3, method=method))
    for name, w, u, v in zip(names, is_weight, sampled, exact, strict=True):
        if not w:  # grads of x, of the LayerNorms and of the biases are exact
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5, msg=name)
    matched = match_linear_draws(draws, rows)
    assert sorted(n for _, names in matched for n in names) == sorted(
        n.removesuffix(".weight") for n, w in zip(names, is_weight, strict=True) if w
    )
    by_name = dict(zip(names, sampled, strict=True))
    for linear, estimate in linear_weight_estimates(matched, rows).items():
        assert_same_estimate(by_name[f"{linear}.weight"], estimate)
    redrawn = linear_weight_estimates(matched, rows, 20_000)
    exact_by_name = dict(zip(names, exact, strict=True))
    assert_unbiased(torch.cat([e.flatten(1) for e in redrawn.values()], 1),
                    torch.cat([exact_by_name[f"{n}.weight"].flatten() for n in redrawn]))  # fmt: skip


@pytest.mark.slow
def test_lean_block_has_lower_weight_gradient_variance_than_norm_sampled_linears(monkeypatch):
    """Same block, same input and output gradient, ratio 0.3: p ∝ ‖g‖·‖x‖ (lean) against the linears'
    p ∝ ‖x‖ (`prob="norm"`, q/k/v sharing one draw), summed over the six weight gradients (2,000 draws of
    each op's estimate, from the probabilities it drew with)."""
    base = tiny_vit("eager", layers=1)
    x = skewed(4, 17, 32).requires_grad_()
    g = skewed(4, 17, 32)
    cfg = CRSConfig(ratio=0.3, prob="norm")
    rows = linear_rows(base.vit.layers[0], lambda: (base.vit.layers[0](x) * g).sum())
    variance = {}
    for name, module, by_input in (("lean", crs_lean, False), ("linears", crs_functional, True)):
        model = inject(copy.deepcopy(base), cfg, ["lean_block"] if name == "lean" else LINEAR_TARGETS)
        layer = model.vit.layers[0]
        with monkeypatch.context() as patch:
            draws = record_draws(patch, module)
            torch.autograd.grad((layer(x) * g).sum(), block_weights(layer))
        redrawn = linear_weight_estimates(match_linear_draws(draws, rows, by_input), rows, 2000)
        assert len(redrawn) == 6
        variance[name] = sum(e.var(0).sum().item() for e in redrawn.values())
    assert variance["lean"] < 0.8 * variance["linears"], variance


# ---------------------------------------------------------------- saved bytes = the analytic model
@pytest.mark.slow
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("attn", ATTNS)
def test_lean_block_saved_bytes_equal_the_analytic_model(attn, autocast):
    """A ViT-B/16-shaped block (width 768, 12 heads, 3072, 197 tokens; batch 2), checkpointing off and on, the
    stream kept as computed and in bfloat16 (crs.keep_dtype)."""
    model = ViTForImageClassification(ViTConfig(num_hidden_layers=1, num_labels=10, attn_implementation=attn))
    shape = BlockShape(2, 197, 768, 12, 3072, 1)
    h = torch.randn(2, 197, 768, requires_grad=True)
    for ratio, keep_dtype in ((0.3, None), (0.3, "bfloat16"), (1.0, None)):
        cfg = CRSConfig(ratio=ratio, keep_dtype=keep_dtype)
        inject(model, cfg, ["lean_block"])
        for checkpointing in (False, True):
            if checkpointing:
                model.activation_checkpointing_enable()
            model.train()
            amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
            with amp, SavedTensorsMeter(exclude=model.parameters()) as meter:
                out = model.vit.layers[0](h)
            measured = meter.bytes
            del out
            ideal = analytic_block_saved_bytes(shape, attn, autocast, cfg, ["lean_block"], checkpointing)
            exact = analytic_block_saved_bytes(shape, attn, autocast)
            if ratio == 1.0:  # the plain block (checkpointed: its input alone), no recomputation of its own
                assert measured == ideal == (197 * 2 * 768 * 4 if checkpointing else exact)
                continue
            assert ideal == vit_block_saved_bytes(
                2, 197, 768, 12, 3072, cfg, ["lean_block"], autocast, checkpointing
            )
            stream = 2 if keep_dtype else 4  # bytes per element of the kept x (and x1)
            assert measured == ideal == 197 * 2 * (768 * stream * (1 if checkpointing else 2) + 4)  # + norms
            assert exact / measured > (8 if checkpointing else 4)
        model.activation_checkpointing_disable()


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize(
    "act", [torch.nn.functional.gelu, torch.nn.GELU(), torch.nn.functional.silu, _swiglu],
    ids=["gelu", "nn.GELU", "silu", "swiglu"],
)  # fmt: skip
def test_shared_mlp_backward_is_exact_at_ratio_one_for_any_activation(act):
    """`mlp_backward` (lean block, lean MLP): GELU's own kernel in place, autograd for other activations,
    including a gated one (gate and up stacked in fc1)."""
    x = torch.randn(24, 6, requires_grad=True)
    fc1, fc2 = torch.nn.Linear(6, 24 if act is _swiglu else 12), torch.nn.Linear(12, 6)
    g = torch.randn(24, 6)
    params = (x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    want = torch.autograd.grad((fc2(act(fc1(x))) * g).sum(), params)
    with torch.no_grad():
        args = (x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act, Sampler(CRSConfig(ratio=1.0)))
        got = mlp_backward(*args, output_grad=lambda output: g)
    for u, v in zip(got, want, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def test_lean_block_at_ratio_one_is_the_plain_block():
    """crs.ratio=1 with the lean_block target is exact training at its own speed: no recomputation."""
    base = tiny_vit("eager").train()
    model = inject(copy.deepcopy(base), CRSConfig(ratio=1.0), ["lean_block"])
    x = torch.randn(4, 3, 16, 16)
    with SavedTensorsMeter(exclude=model.parameters()) as lean:
        out = model(x).logits
    with SavedTensorsMeter(exclude=base.parameters()) as ref:
        expected = base(x).logits
    assert lean.bytes == ref.bytes > 0
    out.square().sum().backward()
    expected.square().sum().backward()
    for p, q in zip(base.parameters(), model.parameters(), strict=True):
        assert torch.equal(q.grad, p.grad)


# ---------------------------------------------------------------- one sampling budget split over the blocks
def test_a_split_budget_gives_each_product_rows_by_its_norms_at_the_uniform_cost():
    """k_j ∝ S_j / √c_j at the uniform split's cost; a product whose share exceeds n keeps all n rows and the
    others share the rest; uniform until every product has an estimate."""
    budget = SamplingBudget(CRSConfig(ratio=0.3, budget="split"))
    costs = [9, 4, 4, 1]
    for c in costs:
        budget.add(c)
    assert budget.split(100) == [30, 30, 30, 30]  # nothing observed yet
    for j, s in enumerate([3.0, 2.0, 2.0, 50.0]):  # S/√c: 1, 1, 1, 50
        budget.observe(j, torch.tensor(s))
    # the last one's share (403 rows) is capped at n = 100; the others share the rest equally
    assert budget.split(100) == [26, 26, 26, 100]
    cost = sum(c * k for c, k in zip(costs, budget.split(100), strict=True))
    assert 30 * sum(costs) <= cost <= 30 * sum(costs) + sum(costs)  # the uniform cost, rounded up
    budget.observe(0, torch.tensor(float("nan")))  # a non-finite S is left out
    assert budget.estimate[0] == 3.0


@pytest.mark.slow
def test_lean_block_with_a_split_budget_is_unbiased_and_learns_its_split():
    """crs.budget=split: after the first pass each block's linears keep rows by their S; the estimates stay
    unbiased (each k fixed before its draw) and the gradient error falls at the same cost. (The split is
    blind to the attention kernel: eager only.)"""
    base = tiny_vit("eager", layers=2)
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4) % 5
    weights = [n for n, p in base.named_parameters() if p.dim() == 2 and ".layers." in n]

    def grads(model):
        params = dict(model.named_parameters())
        loss = torch.nn.functional.cross_entropy(model(x).logits, y)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [params[n] for n in weights])])

    exact = grads(base).double()
    models = {
        b: inject(copy.deepcopy(base), CRSConfig(ratio=0.3, budget=b), ["lean_block"])
        for b in ("uniform", "split")
    }
    draws = {b: torch.stack([grads(m).double() for _ in range(150)]) for b, m in models.items()}
    budget = crs_state(models["split"]).budget
    assert len(budget.costs) == 2 * 4 and not budget.estimate.isnan().any()
    assert len(set(budget.split(4 * 17))) > 1  # the products keep different numbers of rows
    se = draws["split"].std(0) / math.sqrt(150)
    worst = ((draws["split"].mean(0) - exact).abs() / (5.5 * se + 1e-6 * exact.abs().max())).max().item()
    assert worst <= 1.0, f"estimate off by {worst:.2f} x the 5.5-sigma tolerance"
    error = {b: (d - exact).square().sum(1).mean().item() for b, d in draws.items()}
    assert error["split"] < error["uniform"], error
