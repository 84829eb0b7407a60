"""`SamplingGenerator`: the random stream one model's sampled ops draw their rows from."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn


class SamplingGenerator(nn.Module):
    """The random stream of one injected model, shared by its sampled ops (`inject` makes it).

    Unseeded (seed None), draws use torch's global RNG; `manual_seed(seed)`: one `torch.Generator` per device
    type, seeded where the model first samples on it (a CUDA generator's state does not depend on the GPU's
    index). No tensors, so nothing in `state_dict`; checkpoints carry `get_state()`. A restored state resumes
    the same draws on its device type; one saved for another type only (a GPU checkpoint on a CPU machine)
    gives a fresh stream from the seed, with one warning.
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._restored: dict[str, Tensor] = {}  # saved states of device types not sampled on yet

    def manual_seed(self, seed: int) -> None:
        """Start a fresh stream from `seed` (e.g. the run's seed + the data-parallel rank)."""
        self.seed = int(seed)
        self._generators.clear()
        self._restored.clear()

    def for_device(self, device: torch.device) -> torch.Generator | None:
        """The generator to draw with on `device`, or None (torch's global RNG) when unseeded."""
        if self.seed is None:
            return None
        gen = self._generators.get(device.type)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if device.type in self._restored:
                gen.set_state(self._restored.pop(device.type))
            elif self._restored:
                warnings.warn(
                    f"the checkpoint's CRS sampling stream was saved on {', '.join(self._restored)}, not "
                    f"{device.type}: sampling on {device.type} starts a fresh stream from seed {self.seed}",
                    stacklevel=2,
                )
            self._generators[device.type] = gen
        return gen

    def get_state(self) -> dict:
        """{"seed": int | None, "states": {device type: generator state}}, for checkpoints."""
        states = {**self._restored, **{t: g.get_state() for t, g in self._generators.items()}}
        return {"seed": self.seed, "states": states}

    def set_state(self, state: dict) -> None:
        """Restore what `get_state` returned (device keys such as "cuda:3" are read as their type)."""
        self._generators.clear()
        self.seed = state.get("seed")
        self._restored = {key.partition(":")[0]: s for key, s in state.get("states", {}).items()}
