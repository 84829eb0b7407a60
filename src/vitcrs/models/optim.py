"""`OptimConfig`: AdamW with linear warm-up then linear decay to 0, stepped every batch (conf/optim)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from vitcrs.errors import ConfigError


def _check_number(key: str, value: Any, lo: float, hi: float | None, hint: str) -> None:
    """ConfigError unless `value` (the setting `key`) is a finite number in [lo, hi) ([lo, inf) for None)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and value >= lo and (hi is None or value < hi)):
        span = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ConfigError(f"{key}={value!r} is invalid: it must be a number {span}. {hint}")


@dataclass(frozen=True)
class OptimConfig:
    """lr: peak learning rate, in (0, 1); weight_decay >= 0 (decoupled, not on biases and norm weights);
    warmup_fraction: share of all optimizer steps warming up from 0 to lr, in [0, 1). Bad values raise
    ConfigError naming the `optim.*` key."""

    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1

    def __post_init__(self) -> None:
        # AdamW moves each weight by about lr per step: lr >= 1 (or inf) wrecks the weights in a step or two.
        _check_number("optim.lr", self.lr, 0, 1, "Give a positive learning rate below 1, e.g. optim.lr=5e-5.")
        if self.lr == 0:
            raise ConfigError("optim.lr=0 is invalid: it must be > 0, e.g. optim.lr=5e-5.")
        _check_number("optim.weight_decay", self.weight_decay, 0, None, "e.g. optim.weight_decay=0.01.")
        _check_number("optim.warmup_fraction", self.warmup_fraction, 0, 1, "e.g. optim.warmup_fraction=0.1.")

    @classmethod
    def from_settings(cls, settings: OptimConfig | Mapping[str, Any]) -> OptimConfig:
        """The checked settings of the `optim` config node (or an OptimConfig, returned as it is)."""
        if isinstance(settings, OptimConfig):
            return settings
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            allowed = ", ".join(f.name for f in fields(cls))
            raise ConfigError(f"optim has unknown keys {unknown}: allowed are {allowed}.")
        return cls(**settings)

    def param_groups(self, params: Iterable[nn.Parameter]) -> list[dict[str, Any]]:
        """AdamW groups of the trainable `params`: decay on matrices, none on biases and norm weights."""
        params = [p for p in params if p.requires_grad]
        decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
        return [
            {"name": "decay", "params": decay, "weight_decay": self.weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        ]

    def build(self, params: Iterable[nn.Parameter], total_steps: int) -> dict[str, Any]:
        """Lightning's `configure_optimizers` answer: AdamW and its per-step schedule over `total_steps`."""
        optimizer = torch.optim.AdamW(self.param_groups(params), lr=self.lr)
        total = max(1, int(total_steps))
        scheduler = get_linear_schedule_with_warmup(optimizer, round(self.warmup_fraction * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
