"""`OptimConfig`: AdamW with linear warm-up then linear decay to 0, stepped every batch (conf/optim), and
`AdamWInBackward`, the same AdamW applied to each parameter inside backward (`optim.in_backward`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from transformers import get_linear_schedule_with_warmup

from vitcrs.errors import ConfigError, check_bool


def _check_number(key: str, value: Any, lo: float, hi: float | None, hint: str) -> None:
    """ConfigError unless `value` (the setting `key`) is a finite number in [lo, hi) ([lo, inf) for None)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and value >= lo and (hi is None or value < hi)):
        span = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ConfigError(f"{key}={value!r} is invalid: it must be a number {span}. {hint}")


class AdamWInBackward(torch.optim.AdamW):
    """AdamW that updates each parameter inside backward, as soon as its gradient is complete
    (`register_post_accumulate_grad_hook`), and then drops that gradient: no gradient buffer of the whole
    model lives between backward and the step, and the step needs no model-sized temporaries.

    The same optimizer to every outside reader: `param_groups` (the schedule sets the lr there), `state_dict`
    (an AdamW's, so checkpoints resume with either), `step(closure)` (Lightning's automatic optimization: the
    closure runs forward and backward, which does the updates; nothing is left to step). Fused AdamW, one
    parameter at a time. A parameter whose gradient is not finite is not updated (the fused kernel skips it on
    the device, no host sync) and `nonfinite` (a device bool) records it until `take_nonfinite()` reads it.

    One backward = one step: gradient accumulation over several backward passes, clipping by the global
    gradient norm, a GradScaler (fp16) and data parallelism (gradients are averaged after each parameter's
    hook) do not fit; `OptimConfig.check_in_backward` refuses them.
    """

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        super().__init__(params, fused=True, **kwargs)
        self._group_of = {p: group for group in self.param_groups for p in group["params"]}
        self.nonfinite: Tensor | None = None
        self._hooks = [p.register_post_accumulate_grad_hook(self._update) for p in self._group_of]

    @torch.no_grad()
    def _update(self, p: Tensor) -> None:
        bad = ~torch.isfinite(p.grad).all()
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
        groups, self.param_groups = self.param_groups, [{**self._group_of[p], "params": [p]}]
        self.found_inf = bad.float()  # read by the fused kernel: skip this parameter's update when set
        try:
            super().step()
        finally:
            self.param_groups = groups
            del self.found_inf
            p.grad = None

    def take_nonfinite(self) -> Tensor | None:
        """Whether a gradient since the last call was not finite (a device bool, or None: no update ran)."""
        flag, self.nonfinite = self.nonfinite, None
        return flag

    def remove_hooks(self) -> None:
        """Stop updating in backward (e.g. before the model is trained by another optimizer)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


@dataclass(frozen=True)
class OptimConfig:
    """lr: peak learning rate, in (0, 1); weight_decay >= 0 (decoupled, not on biases and norm weights);
    warmup_fraction: share of all optimizer steps warming up from 0 to lr, in [0, 1); in_backward: apply each
    parameter's AdamW update inside backward, as soon as its gradient is complete (`AdamWInBackward`: no
    gradient buffer; the same updates). Bad values raise ConfigError naming the `optim.*` key."""

    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    in_backward: bool = False

    def __post_init__(self) -> None:
        # AdamW moves each weight by about lr per step: lr >= 1 (or inf) wrecks the weights in a step or two.
        _check_number("optim.lr", self.lr, 0, 1, "Give a positive learning rate below 1, e.g. optim.lr=5e-5.")
        if self.lr == 0:
            raise ConfigError("optim.lr=0 is invalid: it must be > 0, e.g. optim.lr=5e-5.")
        _check_number("optim.weight_decay", self.weight_decay, 0, None, "e.g. optim.weight_decay=0.01.")
        _check_number("optim.warmup_fraction", self.warmup_fraction, 0, 1, "e.g. optim.warmup_fraction=0.1.")
        check_bool("optim.in_backward", self.in_backward)

    def check_in_backward(
        self, accumulate: Any, clip: Any, precision: Any, processes: int, fidelity_every: Any
    ) -> None:
        """ConfigError when optim.in_backward=true meets a setting it cannot serve (each backward must be one
        whole step on one process, with the gradient of each parameter used as it comes)."""
        if not self.in_backward:
            return
        refused = [
            ("trainer.accumulate_grad_batches", accumulate, accumulate not in (None, 1),
             "accumulates several backward passes"),
            ("trainer.gradient_clip_val", clip, clip is not None, "clips by the norm of the whole gradient"),
            ("trainer.precision", precision, str(precision).startswith("16"),
             "scales fp16 gradients with a GradScaler"),
            ("trainer.devices", processes, processes > 1, "averages the gradients of several processes"),
            ("callbacks.grad_fidelity.every_n_steps", fidelity_every, bool(fidelity_every),
             "compares the whole sampled gradient with the exact one"),
        ]  # fmt: skip
        for key, value, bad, reason in refused:
            if bad:
                raise ConfigError(
                    f"optim.in_backward=true updates each parameter inside backward, as soon as its gradient "
                    f"is complete, but {key}={value!r} {reason}, which needs the whole gradient first. Set "
                    f"optim.in_backward=false, or drop {key}."
                )

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
        """Lightning's `configure_optimizers` answer: AdamW (in backward with `in_backward`) and its per-step
        schedule over `total_steps`."""
        adamw = AdamWInBackward if self.in_backward else torch.optim.AdamW
        optimizer = adamw(self.param_groups(params), lr=self.lr)
        total = max(1, int(total_steps))
        scheduler = get_linear_schedule_with_warmup(optimizer, round(self.warmup_fraction * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
