"""The random stream CRS draws its samples from: seeded, one generator per device, saved in checkpoints.

Unseeded, sampling uses torch's global RNG. `manual_seed(seed)` gives CRS its own stream (pass a different
seed per data-parallel rank so ranks draw different rows).
"""

from __future__ import annotations

import torch

_seed: int | None = None
_generators: dict[str, torch.Generator] = {}


def manual_seed(seed: int) -> None:
    """Start a fresh CRS stream from `seed` on every device."""
    global _seed
    _seed = int(seed)
    _generators.clear()


def generator(device: torch.device) -> torch.Generator | None:
    """The CRS generator for `device`, or None (torch's global RNG) when unseeded."""
    if _seed is None:
        return None
    key = str(device)
    gen = _generators.get(key)
    if gen is None:
        gen = torch.Generator(device=device)
        gen.manual_seed(_seed)
        _generators[key] = gen
    return gen


def get_rng_state() -> dict:
    """The seed and each device generator's state, for checkpoints."""
    return {"seed": _seed, "states": {k: g.get_state() for k, g in _generators.items()}}


def set_rng_state(state: dict) -> None:
    """Restore what `get_rng_state` returned."""
    global _seed
    _seed = state.get("seed")
    _generators.clear()
    if _seed is None:
        return
    for key, s in state.get("states", {}).items():
        generator(torch.device(key)).set_state(s)
