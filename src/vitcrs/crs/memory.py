"""`SavedTensorsMeter`: bytes an autograd graph keeps alive between forward and backward."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class SavedTensorsMeter:
    """Context manager summing the bytes of distinct storages saved for backward inside it.

    Storages of `exclude` tensors (e.g. the model's parameters, which live anyway) are not counted.
    A storage saved by several ops (e.g. a shared input) counts once. Read `.bytes` after the block, while
    the graph is still alive.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._excluded = {self._key(t) for t in exclude}
        self._storages: dict[tuple, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @staticmethod
    def _key(t: Tensor) -> tuple:
        return (t.device.type, t.device.index, t.untyped_storage().data_ptr())

    def _pack(self, t: Tensor) -> Tensor:
        key = self._key(t)
        if key not in self._excluded:
            self._storages[key] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> SavedTensorsMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
