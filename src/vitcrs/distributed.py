"""The collectives vitcrs issues beyond Lightning's: gather a small picklable object from every rank, and
compute the logged metrics on every rank before that (so all ranks issue their collectives in one order)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from lightning.pytorch import Trainer


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order; `[obj]` when not distributed. A collective: call it on all ranks.

    For small things (states, a few numbers): it pickles. Tensors should be on the CPU.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sync_logged_metrics(trainer: Trainer) -> None:
    """Compute the logged (`sync_dist`) metrics on this rank now; call on every rank before a collective.

    Reducing them is a collective, which Lightning issues when they are first read and then caches. Rank 0's
    progress bar reads them whenever it renders (at epoch end, before later callbacks), the other ranks only
    when Lightning closes the epoch: a collective of a callback in between would meet the metric reduce on
    the other rank and hang. Reading them here puts the reduce first on every rank.
    """
    if trainer.world_size > 1:
        trainer.callback_metrics  # noqa: B018 (the property computes and caches them)
