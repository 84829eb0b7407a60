"""Monte-Carlo checks of sampled gradients, with the draws batched.

Every sampled weight gradient of vitcrs is Σ_i c_i g_iᵀ x_i over the n rows of a linear's output gradient g
and input x (linears of one input: their gradients side by side), with c from one call of the sampler:
c_i = Σ_{t: idx_t = i} scale_t. It is unbiased when E[c_i] = 1 for every row that carries weight. So a test
records the sampler's calls of one pass (`record_draws`), checks that the op's gradient is that sum for the
draw it made (the draw is used as drawn, `Draw.row_weights`), and draws c anew thousands of times at once from
the same probabilities (`Draw.redraw`): one batched call instead of a forward and backward per draw.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn

from vitcrs.crs.sampling import sample


@dataclass(frozen=True)
class Draw:
    """One call of the sampler: the weights it drew with ([..., n]), k, the method, and what it returned."""

    weights: Tensor
    k: int
    method: str
    idx: Tensor
    scale: Tensor

    def row_weights(self) -> Tensor:
        """c [..., n] of this draw (float64)."""
        return _row_weights(self.idx, self.scale, self.weights.shape[-1])

    def redraw(self, count: int, method: str | None = None) -> Tensor:
        """c [count, ..., n] of `count` independent draws with these weights (and `method`, default the
        recorded one), in one batched call."""
        weights = self.weights.expand(count, *self.weights.shape)
        idx, scale = sample(weights, self.k, method or self.method)
        return _row_weights(idx, scale, self.weights.shape[-1])


def _row_weights(idx: Tensor, scale: Tensor, n: int) -> Tensor:
    out = torch.zeros(*idx.shape[:-1], n, dtype=torch.float64, device=idx.device)
    return out.scatter_add_(-1, idx.long(), scale.double())


def record_draws(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> list[Draw]:
    """From now on, every call of `module.sample` (the sampler the CRS op of `module` calls), with what it
    returned, in call order."""
    draws: list[Draw] = []
    real = module.sample

    def recording(weights: Tensor, k: int, method: str, generator=None) -> tuple[Tensor, Tensor]:
        idx, scale = real(weights, k, method, generator)
        draws.append(Draw(weights.detach().clone(), k, method, idx, scale))
        return idx, scale

    monkeypatch.setattr(module, "sample", recording)
    return draws


def weight_estimates(c: Tensor, g: Tensor, x: Tensor) -> Tensor:
    """Σ_i c_i g_iᵀ x_i for row weights c [..., n], rows g [n, o] and x [n, i] → [..., o, i] (float64)."""
    return torch.einsum("...n,no,ni->...oi", c, g.double(), x.double())


def assert_same_estimate(grad: Tensor, estimate: Tensor) -> None:
    """The op's gradient is `estimate` (float64) up to float32 rounding: the draw it made is used as drawn."""
    tol = 1e-6 * estimate.abs().max().item()
    torch.testing.assert_close(grad.double(), estimate, rtol=1e-5, atol=tol)


def assert_unbiased(samples: Tensor, exact: Tensor, z: float = 5.5) -> None:
    """Every coordinate's mean over the draws (`samples` [D, ...]) within z Monte-Carlo standard errors of the
    exact value."""
    samples, exact = samples.reshape(samples.shape[0], -1).double(), exact.reshape(-1).double()
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(samples.shape[0])
    tol = z * se + 1e-6 * exact.abs().max()
    worst = ((mean - exact).abs() / tol).max().item()
    assert worst <= 1.0, f"estimate off by {worst:.2f} x the {z}-sigma tolerance"


def bias_ratio(samples: Tensor, exact: Tensor, rounding: float = 1e-5) -> float:
    """‖mean − g‖² over its Monte-Carlo expectation tr(Cov)/D (estimated from the D `samples` [D, ...]) plus
    a float-rounding floor (`rounding`·‖g‖)²: about 1 for unbiased draws whatever D (for many coordinates),
    far above for a biased estimator, e.g. a wrong 1/(k·p) scale."""
    samples, exact = samples.reshape(samples.shape[0], -1).double(), exact.reshape(-1).double()
    mean_err = (samples.mean(0) - exact).square().sum().item()
    expected = samples.var(0).sum().item() / samples.shape[0] + (rounding * exact.norm().item()) ** 2
    return mean_err / expected


def linear_rows(model: nn.Module, loss: Callable[[], Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Name -> (input rows x [n, i], output-gradient rows g [n, o]) of every nn.Linear of `model` in one
    forward and backward of `loss()` (its parameters' gradients accumulate as usual), in forward order."""
    inputs: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}

    def hook(name: str):
        def forward(_module: nn.Module, args: tuple, output: Tensor) -> None:
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1])
            output.register_hook(lambda g: grads.__setitem__(name, g.detach().reshape(-1, g.shape[-1])))

        return forward

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(hook(n)) for n, m in linears]
    try:
        loss().backward()
    finally:
        for handle in handles:
            handle.remove()
    return {name: (x, grads[name]) for name, x in inputs.items() if name in grads}


def match_linear_draws(
    draws: list[Draw], rows: dict[str, tuple[Tensor, Tensor]], by_input: bool = False
) -> list[tuple[Draw, list[str]]]:
    """Each draw with the linears (names) whose weight gradients it sampled: those of one input whose
    ‖[g_1 … g_J]_i‖·‖x_i‖ (the optimal probabilities of the lean ops) or, `by_input`, whose ‖x_i‖ (crs.prob
    norm) are the draw's weights; of several alike (LayerNorm outputs of equal row norms), the first in
    forward order not matched yet (ops that draw in forward draw in that order). Fails for a draw that
    matches none."""
    groups: list[list[str]] = []
    for name, (x, _) in rows.items():
        group = next((names for names in groups if torch.equal(rows[names[0]][0], x)), None)
        if group is None:
            groups.append([name])
        else:
            group.append(name)
    matched, used = [], set()
    for draw in draws:
        found = None
        for i, names in enumerate(groups):
            x = rows[names[0]][0]
            want = torch.linalg.vector_norm(x, dim=-1)
            if not by_input:
                want = want * torch.linalg.vector_norm(torch.cat([rows[n][1] for n in names], dim=-1), dim=-1)
            close = want.shape == draw.weights.shape
            if (
                i not in used
                and close
                and torch.allclose(draw.weights, want, rtol=1e-3, atol=1e-6 * float(want.max()))
            ):
                found = i
                break
        assert found is not None, "a draw of no linear: its weights are not those of any linear's rows"
        used.add(found)
        matched.append((draw, groups[found]))
    return matched


def linear_weight_estimates(
    matched: list[tuple[Draw, list[str]]], rows: dict[str, tuple[Tensor, Tensor]], count: int | None = None
) -> dict[str, Tensor]:
    """Name -> the weight-gradient estimate of each matched linear: of the recorded draw ([o, i]), or of
    `count` draws anew ([count, o, i])."""
    out = {}
    for draw, names in matched:
        x = rows[names[0]][0]
        g = torch.cat([rows[n][1] for n in names], dim=-1)
        c = draw.row_weights() if count is None else draw.redraw(count)
        estimate = weight_estimates(c, g, x)
        sizes = [rows[n][1].shape[-1] for n in names]
        out.update(zip(names, estimate.split(sizes, dim=-2), strict=True))
    return out
