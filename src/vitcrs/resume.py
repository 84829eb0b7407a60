"""Exact resumption: a training loader whose position is saved in checkpoints, and checkpoint resolution.

A plain shuffled `DataLoader` draws its order from the global RNG when an epoch starts and cannot say how far
it got, so a run resumed from a mid-epoch checkpoint would see other batches than an unbroken one (Lightning
warns about it). `ResumableLoader` makes the training data a function of (seed, epoch, step, rank):

- the epoch's order is `randperm(n)` from a generator seeded by (seed, epoch), the same for every world size;
- each optimizer step takes the next `batch_size x world_size` images of that order, rank r every W-th one
  (as `DistributedSampler` would), so a 2-process run with batch b sees the images of a 1-process run with
  batch 2b, step by step;
- each batch is collated (random crop/flip) under a torch seed derived from (seed, epoch, step, rank),
  in the worker or main process alike, without touching the caller's global RNG;
- `state_dict()` is (epoch, images of the epoch consumed), which Lightning stores in every checkpoint; a
  resumed run skips exactly those images (by index, without loading them);
- with `indices=True` each batch also carries its images' dataset indices (int64 [B], a third element),
  which `crs.prob=sample_cache` keys its per-image cache by.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from vitcrs.errors import ConfigError

log = logging.getLogger(__name__)

LAST = "last"  # ckpt_path=last: <run_dir>/checkpoints/last.ckpt


def mix_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (numpy's SeedSequence), e.g. (seed, epoch, step, rank)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class _Batch(list):
    """A batch of dataset indices that carries the seed its collate must use."""

    seed: int


class _KeyedDataset(Dataset):
    """Hands the collate function (seed, items, indices) for a `_Batch` (one gather when supported)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, batch: _Batch) -> tuple[int, Any, list[int]]:
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(list(batch)) if getitems else [self.dataset[i] for i in batch]
        return batch.seed, items, list(batch)


class _SeededCollate:
    """Runs the wrapped collate_fn (augmentation included) under the batch's own torch seed; with `indices`,
    appends the batch's dataset indices (int64 [B]) to the collated tuple."""

    def __init__(self, collate_fn: Callable[[Any], Any], indices: bool = False) -> None:
        self.collate_fn = collate_fn
        self.indices = indices

    def __call__(self, keyed: tuple[int, Any, list[int]]) -> Any:
        seed, items, batch = keyed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.collate_fn(items)
        return (*out, torch.tensor(batch, dtype=torch.int64)) if self.indices else out


class _EpochBatches:
    """Batch sampler of one rank: the (seed, epoch) order from `offset` on, every W-th image, in batches."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size = 0, 1
        self.epoch = 0
        self.offset = 0  # images of this epoch's order consumed before this pass (a resumed run)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every epoch (as for a DistributedSampler)."""
        self.epoch = int(epoch)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=generator)

    def per_rank(self, remaining: int) -> int:
        return math.ceil(remaining / self.world_size) if remaining > 0 else 0

    def __len__(self) -> int:
        """Batches of a whole epoch on this rank."""
        per_rank = self.per_rank(self.n)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[_Batch]:
        rest = self.order()[self.offset :]
        if len(rest) == 0:
            return
        pad = self.per_rank(len(rest)) * self.world_size - len(rest)
        if pad:  # as DistributedSampler: repeat the start so that every rank gets as many images
            rest = torch.cat([rest, rest.repeat(math.ceil(pad / len(rest)))[:pad]])
        mine = rest[self.rank :: self.world_size].tolist()
        first_step = self.offset // (self.batch_size * self.world_size)
        for j, start in enumerate(range(0, len(mine), self.batch_size)):
            batch = _Batch(mine[start : start + self.batch_size])
            if self.drop_last and len(batch) < self.batch_size:
                return
            batch.seed = mix_seed(self.seed, self.epoch, first_step + j, self.rank)
            yield batch


class ResumableLoader:
    """The training loader of `loader` (a map-style `DataLoader`), made deterministic and resumable.

    seed: the run's seed (order and augmentation); rank, world_size: this process's share (data parallel).
    indices: append each batch's dataset indices (int64 [B]) to what the collate_fn returns (a tuple).
    Keeps the loader's dataset, batch size (per rank), shuffle, drop_last, collate_fn and worker settings.
    Lightning calls `set_epoch` (via `.sampler`) before each epoch and stores `state_dict()` in checkpoints.
    """

    def __init__(
        self, loader: DataLoader, seed: int, rank: int = 0, world_size: int = 1, indices: bool = False
    ) -> None:
        if not isinstance(loader.batch_sampler, BatchSampler) or not isinstance(
            loader.sampler, (RandomSampler, SequentialSampler)
        ):
            raise TypeError("ResumableLoader needs a DataLoader with batch_size and shuffle=True/False")
        self.sampler = _EpochBatches(
            len(loader.dataset),  # type: ignore[arg-type]
            int(loader.batch_size or 1),
            shuffle=isinstance(loader.sampler, RandomSampler),
            drop_last=loader.drop_last,
            seed=seed,
        )
        self.sampler.rank, self.sampler.world_size = int(rank), int(world_size)
        self.dataset = loader.dataset
        workers: dict[str, Any] = {}
        if loader.num_workers > 0:
            workers = {
                "persistent_workers": loader.persistent_workers,
                "prefetch_factor": loader.prefetch_factor,
                "multiprocessing_context": loader.multiprocessing_context,
                "worker_init_fn": loader.worker_init_fn,
                "timeout": loader.timeout,
            }
        self._loader = DataLoader(
            _KeyedDataset(loader.dataset),
            batch_sampler=self.sampler,
            num_workers=loader.num_workers,
            collate_fn=_SeededCollate(loader.collate_fn, indices),
            pin_memory=loader.pin_memory,
            generator=torch.Generator().manual_seed(mix_seed(seed, 1)),  # leaves the global RNG alone
            **workers,
        )
        self._yielded = 0
        self._resume: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing below runs before the first batch is asked for, i.e. after Lightning's
        # set_epoch and load_state_dict.
        s = self.sampler
        s.offset = 0
        if self._resume is not None and self._resume["epoch"] == s.epoch:
            s.offset = min(s.n, int(self._resume["consumed"]))
            log.info("train data: epoch %d resumes after %d of %d images", s.epoch, s.offset, s.n)
        self._resume = None
        self._yielded = 0
        for batch in self._loader:
            self._yielded += 1
            yield batch

    def consumed(self) -> int:
        """Images of the current epoch's order taken by all ranks together."""
        s = self.sampler
        return min(s.n, s.offset + self._yielded * s.batch_size * s.world_size)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.sampler.epoch, "consumed": self.consumed(), "seed": self.sampler.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.sampler.seed) != self.sampler.seed:
            log.warning(
                "resuming with seed=%s, the checkpoint's run had seed=%s: the rest of the epoch follows the "
                "new seed's order",
                self.sampler.seed,
                state.get("seed"),
            )
        self._resume = dict(state)


def resumable_train_data(datamodule: Any, seed: int, indices: bool = False) -> Any:
    """Make `datamodule.train_dataloader()` return a `ResumableLoader` (in place; returns the datamodule).

    indices: its batches also carry the images' dataset indices (for `crs.prob=sample_cache`).

    The rank and world size are read from `datamodule.trainer` when Lightning asks for the loader. The
    loader's position is also kept as the datamodule's checkpoint state: Lightning restores that before it
    builds the loader, whereas its own loader-state restore is skipped when `configure_optimizers` has
    already built the loader (`estimated_stepping_batches`). A loader `ResumableLoader` cannot wrap (no
    batch_size, a custom sampler) is returned as it is.
    """
    make = datamodule.train_dataloader
    current: dict[str, Any] = {"loader": None, "pending": None}

    def train_dataloader() -> Any:
        loader = make()
        trainer = getattr(datamodule, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        try:
            loader = ResumableLoader(loader, seed, rank, world, indices)
        except TypeError as err:
            log.warning("%s: mid-epoch resumption will not be exact", err)
            return loader
        if current["pending"] is not None:
            loader.load_state_dict(current["pending"])
        current["loader"] = loader
        return loader

    def state_dict() -> dict[str, Any]:
        loader = current["loader"]
        return {"train_loader": loader.state_dict()} if loader is not None else {}

    def load_state_dict(state: dict[str, Any]) -> None:
        if "train_loader" not in state:
            return
        current["pending"] = state["train_loader"]
        if current["loader"] is not None:
            current["loader"].load_state_dict(state["train_loader"])

    datamodule.train_dataloader = train_dataloader
    datamodule.state_dict = state_dict
    datamodule.load_state_dict = load_state_dict
    return datamodule


def last_checkpoint(run_dir: str | Path) -> Path:
    """Where a run keeps its latest checkpoint: <run_dir>/checkpoints/last.ckpt (it may not exist yet)."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str | Path) -> str | None:
    """`last` -> <run_dir>/checkpoints/last.ckpt when it exists (else None: a fresh start); paths as given."""
    if ckpt_path != LAST:
        return ckpt_path
    last = last_checkpoint(run_dir)
    if last.is_file():
        return str(last)
    log.warning("ckpt_path=last: there is no %s yet, so this run starts from scratch", last)
    return None


def checkpoint_run_dir(ckpt_path: Any, default: str) -> str:
    """Resolver `vitcrs.run_dir`: the run dir of an existing <run dir>/checkpoints/*.ckpt, else `default`.

    Lets `ckpt_path=<run dir>/checkpoints/last.ckpt` continue the run in its own directory.
    """
    if isinstance(ckpt_path, str) and ckpt_path not in ("", LAST):
        path = Path(ckpt_path).expanduser()
        if path.is_file() and path.parent.name == "checkpoints":
            return str(path.parent.parent)
    return default


def hydra_output_subdir(run_dir: Any, stamp: str) -> str | None:
    """Resolver `vitcrs.hydra_subdir`: `.hydra`, or `.hydra/<stamp>` when the run dir already has a config.

    A resumed (or re-used) run dir keeps its original `.hydra/config.yaml`; each later launch gets its own.
    None (nothing saved) in the tasks of a multi-task SLURM job other than the first: they share its dir.
    """
    if os.environ.get("SLURM_PROCID", "0") != "0":
        return None
    if (Path(str(run_dir)) / ".hydra" / "config.yaml").is_file():
        return f".hydra/{stamp}"
    return ".hydra"


def check_checkpoint(
    ckpt_path: str, num_classes: int, dataset: str, shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, Any]:
    """ConfigError unless `ckpt_path` is a readable vitcrs checkpoint with a `num_classes`-way classifier and,
    given `shapes` (the network's weight shapes, see `vitcrs.models.parameter_shapes`), that architecture.

    Reads only the checkpoint's metadata (memory-mapped; tensors are not loaded). Returns its hyperparameters.
    """
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # a truncated or foreign file: pickle, zip or torch errors
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} cannot be read as a checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Give a checkpoint written by vitcrs, e.g. "
            "<run dir>/checkpoints/last.ckpt, or ckpt_path=null to start afresh."
        ) from err
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    labels = hparams.get("num_labels") if isinstance(hparams, dict) else None
    if not isinstance(labels, int) or "state_dict" not in ckpt:
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} is not a vitcrs training checkpoint (no state_dict / num_labels). Give "
            "one written by vitcrs.train, e.g. <run dir>/checkpoints/last.ckpt, or ckpt_path=null."
        )
    if labels != num_classes:
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} holds a {labels}-class classifier, but dataset {dataset!r} has "
            f"{num_classes} classes: resume with the dataset the checkpoint was trained on (and its other "
            "settings), or start afresh with ckpt_path=null."
        )
    if shapes is not None:
        saved = {
            k.removeprefix("net."): tuple(v.shape)
            for k, v in ckpt["state_dict"].items()
            if k.startswith("net.")
        }
        differ = sorted(k for k in saved.keys() | shapes.keys() if saved.get(k) != shapes.get(k))
        if differ:
            k = differ[0]
            raise ConfigError(
                f"ckpt_path={ckpt_path!r} holds another architecture than model.* gives: {len(differ)} "
                f"weights differ, e.g. {k} has shape {saved.get(k)} in the checkpoint but {shapes.get(k)} in "
                "the model (None: absent). Resume with the model settings the checkpoint was trained with "
                "(model=..., model.config.*), or start afresh with ckpt_path=null."
            )
    return hparams


def checkpoint_epochs(ckpt_path: str) -> int:
    """Training epochs done in the run that saved `ckpt_path` (its metrics record's count, else its epoch)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    state = ckpt.get("callbacks", {}).get("MetricsFile", {}) if isinstance(ckpt, dict) else {}
    epochs = state.get("epochs") if isinstance(state, dict) else None
    return int(epochs) if isinstance(epochs, int) else int(ckpt.get("epoch", 0))
