"""Deterministic, exactly resumable sampling, with its own DDP sharding.

The trainer runs with `use_distributed_sampler=False`: the samplers here shard by rank
themselves. A train sampler yields `(index, sample_seed)` pairs, the sample seed drives the
augmentation (see `transforms.py`), and a `ResumableDataLoader` restores the position inside an
epoch, so a run resumed mid-epoch sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from dynlab.data.transforms import SeededTransform

_PERMUTATION_STREAM, _SAMPLE_SEED_STREAM = 0, 1


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the world size under torch.distributed, (0, 1) outside it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _generator(seed: int, epoch: int, stream: int, cycle: int = 0) -> torch.Generator:
    """A torch generator for (seed, epoch, stream[, cycle]), mixed by numpy's SeedSequence."""
    keys = [seed, epoch, stream] + ([cycle] if cycle else [])
    state = np.random.SeedSequence(keys).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def sample_seeds(seed: int, epoch: int, num_samples: int, cycle: int = 0) -> Tensor:
    """The augmentation seed of every dataset index for this epoch (int64 [num_samples])."""
    generator = _generator(seed, epoch, _SAMPLE_SEED_STREAM, cycle)
    return torch.randint(0, 2**62, (num_samples,), generator=generator)


class ResumableSampler(Sampler[tuple[int, int]]):
    """Per-epoch seeded order, sharded over ranks, yielding `(index, sample_seed)` pairs.

    Like DistributedSampler, the order is padded by wrapping around (or cut when `drop_last`)
    so every rank gets the same number of samples, and rank r takes positions r, r+W, ...
    (`sharded=False`: every rank gets the whole order). A loader that is iterated again within an
    epoch (the shorter loader of a `max_size_cycle` combination) gets a fresh order per cycle.
    `resume(epoch, skip, cycle)` drops the first `skip` samples of that cycle of this rank's shard.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        sharded: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_samples, self.seed = num_samples, seed
        self.shuffle, self.drop_last, self.sharded = shuffle, drop_last, sharded
        self.epoch = 0
        self.cycle = 0  # the next iteration's pass over this epoch's order
        self._resume: tuple[int, int, int] | None = None  # (epoch, cycle, skip) not reached yet

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (Lightning calls this)."""
        self.epoch = epoch
        if self._resume is None or self._resume[0] != epoch:
            self.cycle = 0

    def resume(self, epoch: int, skip: int, cycle: int = 0) -> None:
        """Go to `cycle` of `epoch` and leave out the first `skip` samples of this rank's shard."""
        if skip < 0 or cycle < 0:
            raise ValueError(f"skip and cycle must be >= 0, got {skip} and {cycle}")
        self.epoch, self.cycle, self._resume = epoch, cycle, (epoch, cycle, skip)

    def _rank_and_world(self) -> tuple[int, int]:
        return rank_and_world_size() if self.sharded else (0, 1)

    def _shard_length(self, world_size: int) -> int:
        if self.drop_last:
            return self.num_samples // world_size
        return math.ceil(self.num_samples / world_size)

    def __len__(self) -> int:
        return self._shard_length(self._rank_and_world()[1])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rank, world_size = self._rank_and_world()
        cycle, self.cycle = self.cycle, self.cycle + 1
        if self.shuffle:
            generator = _generator(self.seed, self.epoch, _PERMUTATION_STREAM, cycle)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        total = self._shard_length(world_size) * world_size
        order = order.repeat(math.ceil(total / self.num_samples))[:total]
        shard = order[rank::world_size]
        if self._resume is not None and self._resume[:2] == (self.epoch, cycle):
            shard = shard[self._resume[2] :]
            self._resume = None
        seeds = sample_seeds(self.seed, self.epoch, self.num_samples, cycle)[shard]
        yield from zip(shard.tolist(), seeds.tolist(), strict=True)


class EvalSampler(Sampler[tuple[int, int]]):
    """Dataset order, no padding; rank r of W gets [r*n//W, (r+1)*n//W), yielded as `(index, 0)`.

    Concatenating the ranks' outputs in rank order gives the dataset order exactly.
    """

    def __init__(self, num_samples: int) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = num_samples

    def _bounds(self) -> tuple[int, int]:
        rank, world_size = rank_and_world_size()
        n = self.num_samples
        return rank * n // world_size, (rank + 1) * n // world_size

    def __len__(self) -> int:
        start, stop = self._bounds()
        return stop - start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, stop = self._bounds()
        return ((index, 0) for index in range(start, stop))


class SeededDataset(Dataset[tuple[Tensor, int]]):
    """Indexed by `(index, sample_seed)`: the base dataset's `(sample, label)` with `transform`
    applied under that seed."""

    def __init__(self, base: Dataset[tuple[Any, int]], transform: SeededTransform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, seed = key
        sample, label = self.base[index]
        return self.transform(sample, seed), label


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `ResumableSampler` with Lightning's stateful-loader interface.

    The state is {epoch, consumed}: `consumed` counts the batches the training step has
    finished this epoch, kept by `ResumableLoaderCallback` (not the batches yielded, which run
    ahead because Lightning prefetches). Loading it makes the sampler skip those batches.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(
                f"ResumableDataLoader needs a ResumableSampler, got {type(self.sampler).__name__}"
            )
        if self.batch_size is None:
            raise ValueError("ResumableDataLoader needs batch_size (not a batch_sampler)")
        self.consumed = 0

    def __iter__(self) -> Iterator[Any]:
        """Batches, with the sampler consulted only at the first `next()`.

        Lightning creates the iterator before it calls `set_epoch` (at the start of fit), and
        worker processes would read the sampler at creation; deferring keeps the epoch right.
        """
        yield from super().__iter__()

    def state_dict(self) -> dict[str, int]:
        """Where training stands: the sampler's epoch and the batches consumed in it."""
        return {"epoch": self.sampler.epoch, "consumed": self.consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue after the `consumed` batches of `epoch` (Lightning calls this before iterating).

        `consumed` counts the training steps of the epoch; a loader shorter than the epoch (cycled
        by `max_size_cycle`) has been through `consumed // len(self)` whole passes by then.
        """
        self.consumed = state_dict["consumed"]
        cycle, batches = divmod(self.consumed, len(self))
        self.sampler.resume(state_dict["epoch"], batches * self.batch_size, cycle)


def resumable_loaders(trainer: pl.Trainer) -> list[ResumableDataLoader]:
    """The trainer's train loaders that are ResumableDataLoaders."""
    loaders = CombinedLoader(trainer.train_dataloader).flattened
    return [loader for loader in loaders if isinstance(loader, ResumableDataLoader)]


class ResumableLoaderCallback(pl.Callback):
    """Tells every ResumableDataLoader of the fit (one, or each stream of a combined loader) how
    many training steps of the epoch are done; each loader derives its own position from it."""

    def __init__(self) -> None:
        self._loaders: list[ResumableDataLoader] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Looked up once an epoch: the train loaders only change between epochs.
        self._loaders = resumable_loaders(trainer)
        for loader in self._loaders:
            loader.consumed = 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        for loader in self._loaders:
            loader.consumed = batch_idx + 1
