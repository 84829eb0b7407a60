"""The training loader: batches a function of (seed, epoch, step, rank), resumable in the middle of an epoch.

A plain shuffled `DataLoader` draws its order from the global RNG when an epoch starts and cannot say how far
it got, so a run resumed from a mid-epoch checkpoint would see other batches than an unbroken one. Here:

- the epoch's order is `randperm(n)` from a generator seeded by (seed, epoch), the same for every world size;
- each optimizer step takes the next `batch_size x world_size` images of that order, rank r every W-th one
  (as `DistributedSampler` does), so a 2-process run with batch b sees the images of a 1-process run with
  batch 2b, step by step. `EpochSampler` is a `DistributedSampler`, so Lightning keeps it under DDP and
  calls its `set_epoch` before every epoch;
- each batch is collated (random crop/flip) under a torch seed derived from (seed, epoch, step, rank), in a
  worker or the main process alike, without touching the caller's global RNG;
- `TrainLoader.state_dict()` is (epoch, images of the epoch consumed by all ranks, seed); a loader given that
  state skips exactly those images (by index, without loading them) when the epoch starts;
- with `indices=True` each batch also carries its images' dataset indices (int64 [B], a third element),
  which `crs.prob=sample_cache` keys its per-image cache by.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)


def mix_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (numpy's SeedSequence), e.g. (seed, epoch, step, rank)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class EpochSampler(DistributedSampler):
    """One rank's training images of an epoch, from image `start` of the epoch's order on; each index comes
    paired with the seed of the batch it falls in: ``(index, mix_seed(seed, epoch, step, rank))``.

    `len()` is this rank's share of a whole epoch (Lightning counts the epoch's batches from it).
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.size = len(dataset)  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.start = 0  # images of this epoch's order consumed before this pass (a resumed run)

    def order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(self.size, generator=generator)

    def __len__(self) -> int:
        return math.ceil(self.size / self.num_replicas)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        rest = self.order()[self.start :]
        if len(rest) == 0:
            return
        world = self.num_replicas
        pad = math.ceil(len(rest) / world) * world - len(rest)
        if pad:  # as DistributedSampler: repeat the start so that every rank gets as many images
            rest = torch.cat([rest, rest.repeat(math.ceil(pad / len(rest)))[:pad]])
        mine = rest[self.rank :: world].tolist()
        first_step = self.start // (self.batch_size * world)
        for j, begin in enumerate(range(0, len(mine), self.batch_size)):
            seed = mix_seed(self.seed, self.epoch, first_step + j, self.rank)
            for index in mine[begin : begin + self.batch_size]:
                yield index, seed


class _SeededItems(Dataset):
    """Fetches a batch of `(index, seed)` pairs as (seed, items, indices): one gather when supported."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, pair: tuple[int, int]) -> Any:
        return self.dataset[pair[0]]

    def __getitems__(self, pairs: Sequence[tuple[int, int]]) -> tuple[int, Any, list[int]]:
        indices = [index for index, _ in pairs]
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(indices) if getitems else [self.dataset[i] for i in indices]
        return pairs[0][1], items, indices


class _SeededCollate:
    """Runs `collate_fn` (augmentation included) under the batch's own torch seed; with `indices`, appends the
    batch's dataset indices (int64 [B]) to the collated tuple. A class, so worker processes can pickle it."""

    def __init__(self, collate_fn: Callable[[Any], Any], indices: bool) -> None:
        self.collate_fn = collate_fn
        self.indices = indices

    def __call__(self, keyed: tuple[int, Any, list[int]]) -> Any:
        seed, items, indices = keyed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.collate_fn(items)
        return (*out, torch.tensor(indices, dtype=torch.int64)) if self.indices else out


class TrainLoader(DataLoader):
    """A `DataLoader` of `dataset` in the order of `sampler`, collated by `collate_fn` under each batch's
    seed, whose position is a state: `state_dict()` / `load_state_dict()` (kept in checkpoints).

    indices: append each batch's dataset indices (int64 [B]) to what `collate_fn` returns (a tuple).
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: EpochSampler,
        collate_fn: Callable[[Any], Any],
        indices: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(
            _SeededItems(dataset),
            batch_size=sampler.batch_size,
            sampler=sampler,
            collate_fn=_SeededCollate(collate_fn, indices),
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(mix_seed(sampler.seed, 1)),  # leaves the global RNG alone
        )
        self._yielded = 0  # batches handed out in this pass over the epoch
        self._resume: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # A generator: nothing below runs before the first batch is asked for, i.e. after Lightning's
        # set_epoch and load_state_dict.
        s: EpochSampler = self.sampler  # type: ignore[assignment]
        s.start = 0
        if self._resume is not None and self._resume["epoch"] == s.epoch:
            s.start = min(s.size, int(self._resume["consumed"]))
            log.info("train data: epoch %d resumes after %d of %d images", s.epoch, s.start, s.size)
        self._resume = None
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """(epoch, images of the epoch's order taken by all ranks together, seed)."""
        s: EpochSampler = self.sampler  # type: ignore[assignment]
        consumed = min(s.size, s.start + self._yielded * s.batch_size * s.num_replicas)
        return {"epoch": s.epoch, "consumed": consumed, "seed": s.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Skip the images `state` consumed when its epoch starts (a state of another epoch is ignored)."""
        seed = self.sampler.seed  # type: ignore[attr-defined]
        if state.get("seed", seed) != seed:
            log.warning(
                "resuming with seed=%s, the checkpoint's run had seed=%s: the rest of the epoch follows the "
                "new seed's order",
                seed,
                state.get("seed"),
            )
        self._resume = dict(state)
