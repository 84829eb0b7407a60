"""Statistics of repeated sampled gradients: mean ± standard error, and the bias check.

Bias check. Draws d = 1..D of an estimator give errors e_d = ĝ_d − g (g: the exact gradient), i.i.d. with mean
b (the bias) and covariance Σ. The error of the mean of the draws is E‖ē‖² = ‖b‖² + tr(Σ)/D: for an unbiased
estimator it falls like 1/D. With s² = Σ_d ‖e_d − ē‖² / (D − 1) (an unbiased estimate of tr Σ), the statistic

    R = D ‖ē‖² / s²

is about 1 when b = 0 and grows with ‖b‖². For Gaussian errors D‖ē‖² and (D − 1)s² are independent sums
Σ_j λ_j χ²_1 and Σ_j λ_j χ²_{D−1} over the eigenvalues λ_j of Σ; Satterthwaite's approximation makes them
scaled χ² with ν and (D − 1)ν degrees of freedom, ν = (tr Σ)² / tr(Σ²) (exact when the λ_j are equal, and for
rank one), so R ~ F(ν, (D − 1)ν) under b = 0. tr(Σ²) is estimated by the mean of (e_d·e_d')² over pairs d ≠ d'
(unbiased when b = 0; larger otherwise, which only makes the test more conservative). With prob=norm_grad the
probabilities move a little between draws (the running estimate learns from each); every draw stays unbiased,
so the check still applies. The p-value is
P(F > R); the estimator is flagged biased when p < alpha. Everything comes from the Gram matrix of the draws,
so the errors must be held in memory: D × (number of parameters) floats (the caller's dtype); the Gram matrix
is summed in float64 over `GRAM_CHUNK` parameters at a time, never from a float64 copy of all the errors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def mean_se(values: Sequence[float]) -> dict[str, Any]:
    """{"mean", "se", "n"}: mean and its standard error (sample std / √n; None when n < 2)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "se": None, "n": 0}
    mean = math.fsum(values) / n
    if n < 2:
        return {"mean": mean, "se": None, "n": n}
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return {"mean": mean, "se": math.sqrt(var / n), "n": n}


def _beta_cf(a: float, b: float, x: float, max_iter: int = 100_000, eps: float = 1e-15) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), for x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta I_x(a={a}, b={b}) at x={x} did not converge")


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), a, b > 0, x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def f_sf(value: float, dfn: float, dfd: float) -> float:
    """P(F > value) for an F distribution with (dfn, dfd) degrees of freedom (real, > 0)."""
    if value <= 0.0:
        return 1.0
    return betainc(dfd / 2.0, dfn / 2.0, dfd / (dfd + dfn * value))


GRAM_CHUNK = 1 << 20  # parameters per float64 slice of the errors when their Gram matrix is summed

# Relative squared errors below these are float rounding (fp32 gradients: ~1e-14), not sampling or bias.
DETERMINISTIC = 1e-12  # s² / ‖g‖² below this: the draws do not vary
ROUNDOFF = 1e-9  # ‖ē‖² / ‖g‖² below this: no bias worth the name (e.g. a recomputed exact op)


@torch.no_grad()
def bias_check(errors: Tensor, exact_sq_norm: float, alpha: float) -> dict[str, Any]:
    """The bias check of the module docstring on `errors` [D, P] (row d: ĝ_d − g, D >= 3).

    Returns ratio (R), dof (ν), p_value, biased (p < alpha), alpha, draws, mean_err (‖ē‖² / ‖g‖², the
    relative error of the mean of the draws), expected_mean_err (s² / D / ‖g‖², what it is without bias) and
    rel_bias_sq (the unbiased estimate of ‖b‖² / ‖g‖², which may come out negative). For draws that do not
    vary (an exact estimator) ratio, dof and p_value are None and biased is whether ē exceeds rounding.
    """
    draws = errors.shape[0]
    if draws < 3:
        raise ValueError(f"the bias check needs at least 3 draws, got {draws}")
    gram = torch.zeros(draws, draws, dtype=torch.float64, device=errors.device)  # [D, D] of e_d·e_d'
    for chunk in errors.split(GRAM_CHUNK, dim=1):
        part = chunk.double()
        gram += part @ part.T
    diag_sum, total = float(gram.diagonal().sum()), float(gram.sum())
    mean_sq = total / draws**2  # ‖ē‖²
    s2 = max(diag_sum - draws * mean_sq, 0.0) / (draws - 1)
    pair_sum = total - diag_sum
    scale = exact_sq_norm if exact_sq_norm > 0 else float("nan")
    out: dict[str, Any] = {
        "draws": draws,
        "alpha": alpha,
        "mean_err": mean_sq / scale,
        "expected_mean_err": s2 / draws / scale,
        "rel_bias_sq": pair_sum / (draws * (draws - 1)) / scale,
    }
    if not s2 > DETERMINISTIC * scale:  # the draws do not vary: a deterministic error is all bias
        return {**out, "ratio": None, "dof": None, "p_value": None, "biased": out["mean_err"] > ROUNDOFF}
    off = gram[~torch.eye(draws, dtype=torch.bool)]
    tr_sigma2 = float(off.square().mean())
    dof = s2**2 / tr_sigma2 if tr_sigma2 > 0 else math.inf
    ratio = draws * mean_sq / s2
    dof_eval = min(dof, 1e7)  # beyond this the F distribution is a point mass at 1 for any practical R
    p_value = f_sf(ratio, dof_eval, (draws - 1) * dof_eval)
    return {**out, "ratio": ratio, "dof": dof, "p_value": p_value, "biased": p_value < alpha}
