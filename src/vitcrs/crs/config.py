"""`CRSConfig`: how backward passes are sampled."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from vitcrs.errors import ConfigError, check_bool, check_int

from .targets import ALL_TARGETS, MATMUL_TARGETS, validate_targets

METHODS = ("crs", "wta_crs")
PROBS = ("norm", "norm_grad", "sample_cache")
GRAD_PROBS = ("norm_grad", "sample_cache")  # the probabilities that use output-gradient norms
CACHE_FORMATS = ("bfloat16", "uint8")
CACHE_WARMUPS = ("norm", "exact")
BUDGETS = ("uniform", "split")
KEEP_DTYPES = ("bfloat16",)  # crs.keep_dtype's values besides null (keep as computed)
CACHE_FIELDS = ("cache_format", "cache_warmup", "cache_in_checkpoint")  # read with prob="sample_cache" only


@dataclass(frozen=True)
class CRSConfig:
    """Settings of the column-row sampled backward pass; the defaults of the `crs.*` config keys.

    ratio: fraction of column-row pairs kept for backward, in (0, 1]; 1 is the exact op, with no sampling.
    method: "crs" (i.i.d. draws, p ∝ norm) or "wta_crs" (top-c rows kept deterministically, the rest drawn).
    min_k: never keep fewer than this many pairs (k = max(min_k, ceil(ratio · n)), capped at n).
    prob: sampling probabilities: "norm" (p ∝ ‖row‖), "norm_grad" (‖row‖ times a running estimate of the
        output-gradient norm per position, averaged over the batches of earlier backward passes), or
        "sample_cache" (the study's: ‖row‖ times the same image's output-gradient norm at that row, per token,
        or per head and position for the attention matmuls, cached in host memory from the image's previous
        training visit; `vitcrs.crs.sample_cache`). Until a gradient estimate exists, p ∝ ‖row‖ with its
        proper 1/(k·p) scale: every choice is unbiased from the first step. The "mlp" and "lean_block" targets
        draw with p ∝ ‖g‖·‖x‖ (the output gradient is known in their backward) whatever this says.
    grad_ema: momentum of the running estimate (norm_grad; sample_cache's stand-in for images without an
        entry), in [0, 1).
    cache_format: sample_cache's entries: "bfloat16" or "uint8" (a log-scale code in ±9 % steps: half the
        host memory).
    cache_warmup: sample_cache for images without an entry: "norm" (p ∝ ‖row‖ times the stand-in, the
        running mean of the entries written) or "exact" (the first training epoch runs the sampled ops
        exactly, keeping all rows, while the cache fills).
    cache_in_checkpoint: checkpoints also hold every rank's cache entries (GBs for a large training set), so
        a resumed run samples exactly as an unbroken one; False: a resumed run starts with an empty cache
        (its stand-in is kept), unbiased, but drawing other rows than the unbroken run.
    budget: how the lean block and lean MLP spread their rows over the linears of all blocks: "uniform"
        (each keeps k = max(min_k, ceil(ratio · n))) or "split" (the same total cost in rows × GEMM width,
        each linear's k ∝ S / √(d_in · d_out) with S = Σ_i ‖g_i‖·‖x_i‖ from earlier steps: the split that
        minimises the summed variance of the weight gradients; `vitcrs.crs.budget`).
    keep_mid: the lean block keeps, besides its input x, the residual stream between its two halves
        (x1 = x + attention branch: one more [batch, tokens, d] tensor per block) rather than recomputing the
        attention half's output in backward (one more linear and attention forward per block). False halves
        the kept activations; under activation checkpointing the lean block keeps x alone either way.
    keep_dtype: the dtype the lean block and the lean MLP keep their residual stream in (x, and x1): null (as
        computed: fp32 in fp32 and bf16-mixed training) or "bfloat16" (half the kept bytes). The forward is
        exact either way; backward recomputes from the rounded stream, so the gradients carry a small error
        from that rounding (about 2⁻⁹ relative in the recomputed activations) besides the sampling's.
    targets: the ops sampled in every block: names of `vitcrs.crs.targets.KNOWN_TARGETS` (checked by
        `validate_targets`, kept in its canonical order without repeats), e.g. a named set of `TARGET_SETS`;
        default "lean_block" alone (the whole block as one op keeping only its residual stream; every
        activation gradient exact).
    """

    ratio: float = 1.0
    method: str = "wta_crs"
    min_k: int = 1
    prob: str = "norm"
    grad_ema: float = 0.9
    cache_format: str = "bfloat16"
    cache_warmup: str = "norm"
    cache_in_checkpoint: bool = False
    budget: str = "uniform"
    keep_mid: bool = True
    keep_dtype: str | None = None
    targets: tuple[str, ...] = ("lean_block",)

    def __post_init__(self) -> None:
        targets = self.targets
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
            raise ValueError(
                f"crs.targets={targets!r} is invalid: it must be a list of names, e.g. [query,key]."
            )
        object.__setattr__(self, "targets", validate_targets(targets, None))  # canonical order, no repeats
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < float(r) <= 1.0):
            raise ValueError(
                f"crs.ratio={r!r} is invalid: it must be a number in (0, 1], e.g. crs.ratio=0.3."
            )
        if self.method not in METHODS:
            raise ValueError(f"crs.method={self.method!r} is unknown: choose one of {', '.join(METHODS)}.")
        check_int("crs.min_k", self.min_k, 1, example=1)
        if self.prob not in PROBS:
            raise ValueError(f"crs.prob={self.prob!r} is unknown: choose one of {', '.join(PROBS)}.")
        if not isinstance(self.grad_ema, (int, float)) or not (0.0 <= self.grad_ema < 1.0):
            raise ValueError(f"crs.grad_ema={self.grad_ema!r} is invalid: it must be a number in [0, 1).")
        if self.cache_format not in CACHE_FORMATS:
            allowed = ", ".join(CACHE_FORMATS)
            raise ValueError(f"crs.cache_format={self.cache_format!r} is unknown: choose one of {allowed}.")
        if self.cache_warmup not in CACHE_WARMUPS:
            allowed = ", ".join(CACHE_WARMUPS)
            raise ValueError(f"crs.cache_warmup={self.cache_warmup!r} is unknown: choose one of {allowed}.")
        if self.budget not in BUDGETS:
            raise ValueError(f"crs.budget={self.budget!r} is unknown: choose one of {', '.join(BUDGETS)}.")
        check_bool("crs.keep_mid", self.keep_mid)
        if self.keep_dtype is not None and self.keep_dtype not in KEEP_DTYPES:
            raise ValueError(
                f"crs.keep_dtype={self.keep_dtype!r} is unknown: choose null (keep the stream as computed) "
                f"or {', '.join(KEEP_DTYPES)}."
            )
        check_bool("crs.cache_in_checkpoint", self.cache_in_checkpoint)

    @property
    def kept_dtype(self) -> torch.dtype | None:
        """`keep_dtype` as a torch dtype (None: keep as computed)."""
        return None if self.keep_dtype is None else getattr(torch, self.keep_dtype)

    @property
    def exact(self) -> bool:
        return float(self.ratio) >= 1.0

    def num_samples(self, n: int) -> int:
        """k for a contraction of length n: max(min_k, ceil(ratio · n)), at most n."""
        return min(n, max(self.min_k, math.ceil(float(self.ratio) * n - 1e-9)))

    def in_effect(self) -> CRSConfig:
        """These settings with those that change nothing at their defaults, so that runs that sample alike are
        configured and recorded alike: prob, grad_ema and cache_* when no target draws by `prob` ("mlp" and
        "lean_block" draw with p ∝ ‖g‖·‖x‖ whatever it says), grad_ema with prob="norm", cache_* unless
        prob="sample_cache", keep_mid without "lean_block", budget and keep_dtype without "lean_block" or
        "mlp". ratio, method, min_k and targets stay as they are."""
        unused = set()
        if not set(self.targets) & set(ALL_TARGETS):
            unused = {"prob", "grad_ema", *CACHE_FIELDS}
        elif self.prob != "sample_cache":
            unused = {*CACHE_FIELDS, *(("grad_ema",) if self.prob == "norm" else ())}
        if "lean_block" not in self.targets:
            unused.add("keep_mid")
        if not set(self.targets) & {"lean_block", "mlp"}:
            unused |= {"budget", "keep_dtype"}
        default = CRSConfig()
        return replace(self, **{k: getattr(default, k) for k in unused})

    def to_dict(self) -> dict:
        """The `crs` config node of these settings (targets as a list)."""
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_settings(
        cls, settings: CRSConfig | Mapping[str, Any], attn_implementation: str | None
    ) -> CRSConfig:
        """The checked settings of the `crs` config node for a model with `attn_implementation` (the attention
        matmul targets need eager attention); ConfigError naming the key. A CRSConfig is checked as it is."""
        if not isinstance(settings, CRSConfig):
            unknown = sorted(set(settings) - {f.name for f in fields(cls)})
            if unknown:
                allowed = ", ".join(f.name for f in fields(cls))
                raise ConfigError(f"crs has unknown keys {unknown}: allowed are {allowed}.")
            try:
                settings = cls(**settings)
            except ValueError as err:
                raise ConfigError(f"{err} (see vitcrs.crs.CRSConfig)") from err
        try:
            validate_targets(settings.targets, attn_implementation)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        return settings

    def check_sampled(self, vit: Any, image_size: int, batch_size: int) -> None:
        """ConfigError when ratio < 1 would sample nothing for `vit` (a `vitcrs.models.Architecture`) fed
        `batch_size` images of side `image_size` (no targets, or min_k >= every contraction): the run would be
        exact but recorded as sampled."""
        if self.exact:
            return
        targets, ratio = self.targets, float(self.ratio)
        if not targets:
            raise ConfigError(
                f"crs.targets=[] samples nothing, so a crs.ratio={ratio} run would be exact yet recorded as "
                "sampled. Give the ops to sample (e.g. crs.targets=[lean_block]) or crs.ratio=1.0 for an "
                "exact run."
            )
        tokens = vit.tokens(int(image_size))  # patches + prefix tokens (class, distillation, registers)
        # The longest contraction a target samples: tokens of the batch for linears, tokens or the head width
        # for the attention matmuls.
        head = int(vit.hidden_size) // int(vit.num_attention_heads)
        longest = max(max(tokens, head) if t in MATMUL_TARGETS else int(batch_size) * tokens for t in targets)
        if self.min_k >= longest:
            raise ConfigError(
                f"crs.min_k={self.min_k} keeps every pair of every sampled op (the longest contraction has "
                f"{longest}), so a crs.ratio={ratio} run would be exact yet recorded as sampled. Lower "
                "crs.min_k (default 1) or set crs.ratio=1.0 for an exact run."
            )
