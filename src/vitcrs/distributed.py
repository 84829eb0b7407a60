"""The one collective vitcrs needs beyond Lightning's: gather a small picklable object from every rank."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order; `[obj]` when not distributed. A collective: call it on all ranks.

    For small things (states, a few numbers): it pickles. Tensors should be on the CPU.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
