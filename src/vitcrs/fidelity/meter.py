"""The fidelity meter's measurement: exact and sampled gradients of fixed batches through one ViT (any model
family: `vitcrs.models.model_logits`).

`measure(model, batches, configurations, ...)` (the model in eval mode: dropout off; CRS samples whenever
grad is enabled) does, in order:
1. `warmup` exact AdamW steps (constant lr) on their own batches, so the head is not random;
2. the exact gradient g_b of each of the B `noise` batches; batch 0 is the measured batch (g = g_0), and the
   minibatch noise is mean_b ‖g_b − ḡ‖² / ‖ḡ‖² · B / (B − 1) (ḡ their mean), also per block and per kind;
3. per configuration: `inject`, reseed the model's sampling stream (`crs_state(model).generator`) with
   `seed`, run `prime_passes` sampled backward passes on the measured batch (only for probabilities that
   learn from earlier passes, i.e. prob other than "norm"), then `draws` sampled gradients ĝ_d of the
   measured batch. With prob="sample_cache" the measured batch's images are dataset indices 0..B-1 of a
   B-image cache, so the prime passes are their earlier visits (the draws keep updating the entries, as
   norm_grad's estimate).
Every gradient is over `measured_parameters` (head excluded) and compared with `vitcrs.models.fidelity`.
Step time: median seconds of a forward + backward, sampled (the draws) and exact (the noise batches).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitcrs.crs import CRSConfig, attach_sample_cache, crs_state, inject, training_batch, uninjected
from vitcrs.models.fidelity import (
    EMBEDDINGS_BLOCK,
    FINAL_BLOCK,
    KINDS,
    SQ_ERR,
    SQ_EXACT,
    measured_parameters,
    parameter_block,
    parameter_kind,
    parameter_sums,
    rel_err_and_cos,
)
from vitcrs.models.optim import OptimConfig
from vitcrs.models.registry import model_logits

from .stats import bias_check, mean_se

Batch = tuple[Tensor, Tensor]
STATELESS_PROBS = ("norm",)  # probabilities that learn nothing from earlier passes: no priming


@dataclass(frozen=True)
class Configuration:
    """One CRS setting to measure: `CRSConfig` fields plus the inject targets."""

    method: str
    targets: tuple[str, ...]
    ratio: float
    prob: str = "norm"
    min_k: int = 1
    grad_ema: float = 0.9
    budget: str = "uniform"
    keep_dtype: str | None = None

    @property
    def crs_config(self) -> CRSConfig:
        return CRSConfig(**asdict(self))  # every field is one of CRSConfig's

    @property
    def primed(self) -> bool:
        """Whether it learns from earlier passes (gradient-norm estimates, a split budget): primed first."""
        return self.prob not in STATELESS_PROBS or self.budget != "uniform"

    @property
    def label(self) -> str:
        """E.g. "wta_crs 0.3 query,key,value norm" (" split" with a split budget, " bfloat16 stream" with
        crs.keep_dtype=bfloat16)."""
        split = f" {self.budget}" if self.budget != "uniform" else ""
        stream = f" {self.keep_dtype} stream" if self.keep_dtype is not None else ""
        return f"{self.method} {self.ratio:g} {','.join(self.targets)} {self.prob}{split}{stream}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets), "label": self.label}


@dataclass
class Groups:
    """Which block and kind each measured parameter belongs to (index tensors into `blocks` / `kinds`)."""

    blocks: list[str]
    kinds: list[str]
    block_of: Tensor
    kind_of: Tensor

    @classmethod
    def of(cls, names: Sequence[str]) -> Groups:
        block_names = [parameter_block(n) for n in names]
        numbered = sorted({b for b in block_names if b.isdigit()}, key=int)
        present = [b for b in (EMBEDDINGS_BLOCK, *numbered, FINAL_BLOCK) if b in block_names]
        kind_names = [parameter_kind(n) for n in names]
        kinds = [k for k in KINDS if k in kind_names]
        return cls(
            present,
            kinds,
            torch.tensor([present.index(b) for b in block_names], dtype=torch.long),
            torch.tensor([kinds.index(k) for k in kind_names], dtype=torch.long),
        )

    def totals(self, per_param: Tensor) -> tuple[Tensor, Tensor]:
        """Per-parameter values [n, ...] summed per block and per kind."""

        def add(index: Tensor, size: int) -> Tensor:
            out = torch.zeros(size, *per_param.shape[1:], dtype=per_param.dtype)
            return out.index_add_(0, index, per_param)

        return add(self.block_of, len(self.blocks)), add(self.kind_of, len(self.kinds))


@dataclass
class Passes:
    """Forward + backward of a classifier on a batch, giving the gradients of the measured parameters."""

    model: nn.Module
    names: list[str] = field(init=False)
    params: list[nn.Parameter] = field(init=False)

    def __post_init__(self) -> None:
        measured = measured_parameters(self.model)
        self.names = [n for n, _ in measured]
        self.params = [p for _, p in measured]

    def loss(self, batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(model_logits(self.model, x), y)

    def grads(self, batch: Batch) -> tuple[list[Tensor], float]:
        """(gradients [per measured parameter], seconds of the forward + backward); p.grad is not touched."""
        device = batch[0].device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        grads = torch.autograd.grad(self.loss(batch), self.params, allow_unused=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return [
            torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads, strict=True)
        ], seconds


def _ratio(num: Tensor, den: Tensor) -> list[float]:
    return [float(a) / float(b) if float(b) > 0 else float("nan") for a, b in zip(num, den, strict=True)]


def warm_up(
    model: nn.Module, batches: Sequence[Batch], lr: float, weight_decay: float, tick: Callable
) -> None:
    """Exact AdamW steps (constant lr; no decay on biases and norm weights) on `batches`, one step each."""
    groups = OptimConfig(lr=lr, weight_decay=weight_decay).param_groups(model.parameters())
    optimizer = torch.optim.AdamW(groups, lr=lr)
    with uninjected(model):
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model_logits(model, x), y).backward()
            optimizer.step()
            tick()
    optimizer.zero_grad(set_to_none=True)


def exact_gradients(
    passes: Passes, batches: Sequence[Batch], groups: Groups, tick: Callable
) -> tuple[list[Tensor], dict[str, Any]]:
    """The measured batch's exact gradient (batch 0) and the minibatch noise of the B batches."""
    if len(batches) < 2:
        raise ValueError(f"the minibatch noise needs at least 2 batches, got {len(batches)}")
    total: list[Tensor] | None = None
    sq_sum = torch.zeros(len(passes.params), dtype=torch.float64)
    times, first = [], None
    with uninjected(passes.model):
        for batch in batches:
            grads, seconds = passes.grads(batch)
            times.append(seconds)
            sq_sum += parameter_sums(grads, grads)[:, SQ_EXACT]
            if first is None:
                first = grads
                total = [g.double().clone() for g in grads]
            else:
                for t, g in zip(total, grads, strict=True):
                    t.add_(g)
            tick()
    count = len(batches)
    mean = [t / count for t in total]
    mean_sq = parameter_sums(mean, mean)[:, SQ_EXACT]
    spread = (sq_sum - count * mean_sq).clamp_min(0.0) / (count - 1)  # Σ_b ‖g_b − ḡ‖² / (B − 1) per param
    pair = torch.stack([spread, mean_sq], dim=1)
    by_block, by_kind = groups.totals(pair)
    g_sq = parameter_sums(first, first)[:, SQ_EXACT]
    g_block, g_kind = groups.totals(g_sq)
    noise = {
        "batches": count,
        "noise": float(spread.sum() / mean_sq.sum()),
        "per_block": dict(zip(groups.blocks, _ratio(by_block[:, 0], by_block[:, 1]), strict=True)),
        "per_kind": dict(zip(groups.kinds, _ratio(by_kind[:, 0], by_kind[:, 1]), strict=True)),
        "grad_sq_norm": float(g_sq.sum()),
        "grad_sq_norm_per_block": dict(zip(groups.blocks, g_block.tolist(), strict=True)),
        "grad_sq_norm_per_kind": dict(zip(groups.kinds, g_kind.tolist(), strict=True)),
        "step_time_s": statistics.median(times),
    }
    return first, noise


def compare_draws(
    sample: Callable[[], tuple[list[Tensor], float]],
    exact: list[Tensor],
    *,
    draws: int,
    groups: Groups,
    alpha: float,
    tick: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Call `sample()` (→ sampled gradients per parameter, seconds) `draws` times and compare with `exact`.

    Returns rel_err and cos (mean ± se over draws), rel_err_per_draw, per_block and per_kind relative errors
    (each within its block or kind), the bias check (`vitcrs.fidelity.stats.bias_check`) and step_time_s
    (median seconds of a draw). Holds the draws' errors in memory: draws × parameters floats.
    """
    exact_flat = torch.cat([g.reshape(-1) for g in exact])
    errors = torch.empty(draws, exact_flat.numel(), dtype=exact_flat.dtype, device=exact_flat.device)
    sums, times = [], []
    for d in range(draws):
        grads, seconds = sample()
        times.append(seconds)
        sums.append(parameter_sums(grads, exact))
        torch.cat([g.reshape(-1) for g in grads], out=errors[d]).sub_(exact_flat)
        tick()
    per_draw = [rel_err_and_cos(s) for s in sums]
    block_sums, kind_sums = groups.totals(torch.stack(sums).transpose(0, 1))  # [blocks|kinds, D, 4]

    def relative(group_sums: Tensor, names: list[str]) -> dict[str, dict[str, Any]]:
        return {
            name: mean_se(_ratio(group_sums[i, :, SQ_ERR], group_sums[i, :, SQ_EXACT]))
            for i, name in enumerate(names)
        }

    exact_sq = float(parameter_sums(exact, exact)[:, SQ_EXACT].sum())
    return {
        "rel_err": mean_se([r for r, _ in per_draw]),
        "rel_err_per_draw": [r for r, _ in per_draw],
        "cos": mean_se([c for _, c in per_draw]),
        "per_block": relative(block_sums, groups.blocks),
        "per_kind": relative(kind_sums, groups.kinds),
        "bias": bias_check(errors, exact_sq, alpha),
        "step_time_s": statistics.median(times),
    }


def measure_configuration(
    passes: Passes,
    batch: Batch,
    exact: list[Tensor],
    config: Configuration,
    *,
    draws: int,
    prime_passes: int,
    seed: int,
    groups: Groups,
    noise: dict[str, Any],
    alpha: float,
    tick: Callable[[], None],
) -> dict[str, Any]:
    """`draws` sampled gradients of `batch` under `config`, compared with `exact` (see the module doc)."""
    inject(passes.model, config.crs_config)
    crs_state(passes.model).generator.manual_seed(seed)
    images = len(batch[1])
    attach_sample_cache(passes.model, images)  # (prob="sample_cache" only)
    prime_times = []
    try:
        with training_batch(passes.model, torch.arange(images)):
            if config.primed:
                for _ in range(prime_passes):
                    prime_times.append(passes.grads(batch)[1])
                    tick()
            result = compare_draws(
                lambda: passes.grads(batch), exact, draws=draws, groups=groups, alpha=alpha, tick=tick
            )
    finally:
        inject(passes.model, CRSConfig(), ())  # leave the model exact (and drop any cache)
    exact_time, step_time = noise["step_time_s"], result["step_time_s"]
    return {
        **config.to_dict(),
        **result,
        "err_over_noise": result["rel_err"]["mean"] / noise["noise"] if noise["noise"] > 0 else None,
        "prime_passes": len(prime_times),
        "time_vs_exact": step_time / exact_time if exact_time > 0 else None,
    }


def measure(
    model: nn.Module,
    noise_batches: Sequence[Batch],
    configurations: Sequence[Configuration],
    *,
    draws: int,
    prime_passes: int = 0,
    seed: int = 0,
    warmup_batches: Sequence[Batch] = (),
    lr: float = 5e-5,
    weight_decay: float = 0.0,
    alpha: float = 1e-3,
    tick: Callable[[str], None] = lambda phase: None,
) -> dict[str, Any]:
    """Warm up, measure the exact gradient and the minibatch noise, then every configuration (module doc).

    `noise_batches[0]` is the measured batch. `tick(phase)` is called after every forward + backward pass
    (for a progress bar). Returns {"exact": {...}, "configurations": [{...}, ...]} (see docs/fidelity.md).
    The model is put in eval mode and left exact (nothing injected).
    """
    model.eval()
    if warmup_batches:
        warm_up(model, warmup_batches, lr, weight_decay, lambda: tick("warm-up"))
    passes = Passes(model)
    groups = Groups.of(passes.names)
    exact, noise = exact_gradients(passes, noise_batches, groups, lambda: tick("exact gradients"))
    results = []
    for config in configurations:
        results.append(
            measure_configuration(
                passes,
                noise_batches[0],
                exact,
                config,
                draws=draws,
                prime_passes=prime_passes,
                seed=seed,
                groups=groups,
                noise=noise,
                alpha=alpha,
                tick=lambda c=config: tick(c.label),
            )
        )
    return {"exact": noise, "blocks": groups.blocks, "kinds": groups.kinds, "configurations": results}


def passes_needed(configurations: Sequence[Configuration], draws: int, prime_passes: int, noise: int,
                  warmup: int) -> int:  # fmt: skip
    """Forward + backward passes `measure` runs (the progress bar's total)."""
    primed = sum(c.primed for c in configurations)
    return warmup + noise + len(configurations) * draws + primed * prime_passes
