"""What every dynlab DataModule shares: the info the model needs, the held-out split, the loaders.

Each dataset gives its full train set, its test set and two transforms; this base carves the
seeded validation split out of train (used for model selection and for calibrating early-exit
thresholds) and builds resumable train loaders and rank-sharded eval loaders. Techniques ask for
extra streams (`StreamSpec`): seeded subsets of the train split, never touching val, such as
FBNetV2's 20 % for architecture parameters or SPOS's fixed BN-recalibration subset.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from dynlab.data.sampling import (
    EvalSampler,
    ResumableDataLoader,
    ResumableLoaderCallback,
    ResumableSampler,
    SeededDataset,
)
from dynlab.data.transforms import CropFlip, Normalize, SeededTransform, channel_stats
from dynlab.dataset_config import split_problem
from dynlab.errors import ConfigError, DataRootError, require_data_root, where_data_goes


@dataclass(frozen=True)
class DataInfo:
    """What a model must know about a dataset before any data is loaded."""

    name: str
    num_classes: int
    input_size: tuple[int, int, int]  # (C, H, W)


def require_paths(dataset: str, root: str | Path | None, layout: str, paths: list[str]) -> Path:
    """Check that `paths` exist under `root`; raise DataRootError naming the layout otherwise."""
    folder = require_data_root(dataset, root, layout)
    missing = [str(folder / path) for path in paths if not (folder / path).exists()]
    if missing:
        raise DataRootError(f"{dataset}: missing {', '.join(missing)}. {where_data_goes(layout)}")
    return folder


class TensorImages(Dataset[tuple[Tensor, int]]):
    """Images held in memory as uint8 [N,C,H,W] with integer labels [N]."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}"
            )
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


def holdout_split(
    num_samples: int, val_size: int, seed: int, train_subset: int | None = None
) -> tuple[list[int], list[int]]:
    """Seeded (train, val) index lists: val is the last `val_size` of a random permutation, train
    the rest (its first `train_subset` when given: a seeded subset for a small budget).

    As MSDNet's PyTorch loader (Huang et al., ICLR 2018; kalviny/MSDNet-PyTorch `dataloader.py`,
    the implementation the official gaohuang/MSDNet README links).
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_samples, generator=generator).tolist()
    train, val = order[: num_samples - val_size], order[num_samples - val_size :]
    return (train[:train_subset] if train_subset is not None else train), val


@dataclass(frozen=True)
class StreamSpec:
    """An extra stream over a seeded subset of the train split (val is never part of it).

    The subset is drawn by (datamodule seed, `name`): `fraction` or `size` of the train split (all
    of it when both are None); `complement=True` is the rest of the split, so ("arch", 0.2) and
    ("arch", 0.2, complement=True) are disjoint and cover it. `sharded=False` gives every rank the
    whole stream (a search whose ranks train different candidates). `batch_size=None`: the
    datamodule's.
    """

    name: str
    fraction: float | None = None
    size: int | None = None
    complement: bool = False
    augment: bool = True
    shuffle: bool = True
    sharded: bool = True
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.fraction is not None and self.size is not None:
            raise ValueError(f"stream {self.name}: give fraction or size, not both")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"stream {self.name}: fraction must be in (0, 1], got {self.fraction}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"stream {self.name}: size must be >= 1, got {self.size}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"stream {self.name}: batch_size must be >= 1, got {self.batch_size}")


def stream_seed(seed: int, name: str) -> int:
    """A seed for stream `name` of a datamodule seeded by `seed` (stable across processes)."""
    keys = [seed, zlib.crc32(name.encode())]
    return int(np.random.SeedSequence(keys).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Splits:
    """The base datasets, each yielding (untransformed sample, label): `whole` is train and val
    together (a phase that trains on the whole training split, as papers retrain their final
    network)."""

    train: Dataset[tuple[Any, int]]
    val: Dataset[tuple[Any, int]]
    test: Dataset[tuple[Any, int]]
    whole: Dataset[tuple[Any, int]]


class DynlabDataModule(pl.LightningDataModule, ABC):
    """Train / held-out val / test loaders with deterministic, exactly resumable training order."""

    def __init__(
        self,
        *,
        root: str | None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: int,
        seed: int = 0,
        augment: bool = True,
        train_subset: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1 or None, got {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0 (the held-out split), got {val_size}")
        if train_subset is not None and train_subset < 1:
            raise ValueError(f"train_subset must be >= 1 or None, got {train_subset}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.augment = augment
        self.train_subset = train_subset
        self.splits: Splits | None = None
        self.train_streams: dict[str, StreamSpec] | None = None
        self.train_on_whole = False

    @property
    @abstractmethod
    def info(self) -> DataInfo:
        """Name, class count and input size, known without loading any data."""

    @abstractmethod
    def load_train_test(self) -> tuple[Dataset[tuple[Any, int]], Dataset[tuple[Any, int]]]:
        """Load the full train set (val is carved out of it) and the test set."""

    @abstractmethod
    def eval_transform(self) -> SeededTransform:
        """The test-time transform (no randomness); called after `load_train_test`."""

    @abstractmethod
    def augment_transform(self) -> SeededTransform:
        """The training augmentation; called after `load_train_test`."""

    def setup(self, stage: str | None = None) -> None:
        """Load the data once and split off the held-out validation set."""
        if self.splits is not None:
            return
        train_full, test = self.load_train_test()
        num_train = len(train_full)  # type: ignore[arg-type]
        problem = split_problem(self.info.name, self.val_size, num_train, self.train_subset)
        if problem:  # a dataset whose size the schema cannot know (ImageNet's folders)
            key, reason = problem
            raise ConfigError(f"dataset.{key}={getattr(self, key)} {reason}")
        train_idx, val_idx = holdout_split(num_train, self.val_size, self.seed, self.train_subset)
        self.splits = Splits(
            Subset(train_full, train_idx),
            Subset(train_full, val_idx),
            test,
            Subset(train_full, train_idx + val_idx),
        )

    def train_dataloader(self) -> ResumableDataLoader | StreamsLoader:
        """Seeded, sharded, resumable training batches (augmented unless `augment=False`); with
        `set_train_streams`, the streams combined (`max_size_cycle`), a batch being a dict."""
        self._require_loader_callback()
        if self.train_streams is not None:
            loaders = {key: self.stream_loader(spec) for key, spec in self.train_streams.items()}
            return StreamsLoader(loaders, mode="max_size_cycle")
        train = self._train_split()
        transform = self.augment_transform() if self.augment else self.eval_transform()
        return ResumableDataLoader(
            SeededDataset(train, transform),
            batch_size=self.batch_size,
            sampler=ResumableSampler(len(train), self.seed),  # type: ignore[arg-type]
            **self._loader_options(),
        )

    def set_train_streams(self, streams: dict[str, StreamSpec] | None) -> None:
        """Make `train_dataloader()` yield dicts of these streams' batches (None: the one loader).

        Every stream resumes exactly (ResumableLoaderCallback); the shorter ones cycle.
        """
        if streams is not None and not streams:
            raise ValueError("set_train_streams needs at least one stream (or None)")
        self.train_streams = dict(streams) if streams is not None else None

    def set_train_split(self, whole: bool) -> None:
        """Train (loader and streams) on the whole training split, val included (`whole=True`:
        a final retrain or a static run), or on the split less the held-out val (the default)."""
        self.train_on_whole = whole

    def stream_indices(self, spec: StreamSpec) -> list[int]:
        """The stream's samples as positions in the train split (sorted; same on every rank)."""
        n = len(self._train_split())  # type: ignore[arg-type]
        if spec.fraction is None and spec.size is None:
            if spec.complement:
                raise ValueError(f"stream {spec.name}: the complement of the whole split is empty")
            return list(range(n))
        take = spec.size if spec.size is not None else round(spec.fraction * n)  # type: ignore[operator]
        if not 1 <= take <= n - int(spec.complement):
            raise ValueError(
                f"stream {spec.name}: {take} of the {n} training samples leaves "
                f"{'no' if take < 1 else 'nothing for the complement or too few'} samples"
            )
        generator = torch.Generator().manual_seed(stream_seed(self.seed, spec.name))
        order = torch.randperm(n, generator=generator)
        chosen = order[take:] if spec.complement else order[:take]
        return sorted(chosen.tolist())

    def stream_loader(self, spec: StreamSpec) -> DataLoader:
        """A loader over the stream's subset of the train split: a ResumableDataLoader (seeded
        order, exact resume) when shuffled, else the subset in order; sharded by rank unless
        `spec.sharded` is False."""
        subset = Subset(self._train_split(), self.stream_indices(spec))
        augment = spec.augment and self.augment
        transform = self.augment_transform() if augment else self.eval_transform()
        dataset = SeededDataset(subset, transform)
        batch_size = spec.batch_size or self.batch_size
        if spec.shuffle:
            seed = stream_seed(self.seed, spec.name + ("/rest" if spec.complement else ""))
            sampler = ResumableSampler(len(subset), seed, sharded=spec.sharded)
            return ResumableDataLoader(
                dataset, batch_size=batch_size, sampler=sampler, **self._loader_options()
            )
        ordered = EvalSampler(len(subset)) if spec.sharded else _Ordered(len(subset))
        return DataLoader(dataset, batch_size=batch_size, sampler=ordered, **self._loader_options())

    def val_dataloader(self) -> DataLoader:
        """The held-out split of train with the test-time transform, in dataset order."""
        return self._eval_loader(self._splits().val)

    def whole_val_loader(self, limit: int | None = None) -> DataLoader:
        """The whole held-out split (its first `limit` samples) in order on every rank (a search
        scores its own candidate per rank; `val_dataloader` shards it)."""
        val = self._splits().val
        if limit is not None and limit < len(val):  # type: ignore[arg-type]
            val = Subset(val, range(limit))
        return DataLoader(
            SeededDataset(val, self.eval_transform()),
            batch_size=self.eval_batch_size,
            sampler=_Ordered(len(val)),  # type: ignore[arg-type]
            **self._loader_options(),
        )

    def test_dataloader(self) -> DataLoader:
        """The test set in dataset order, sharded contiguously over ranks."""
        return self._eval_loader(self._splits().test)

    def _eval_loader(self, dataset: Dataset[tuple[Any, int]]) -> DataLoader:
        return DataLoader(
            SeededDataset(dataset, self.eval_transform()),
            batch_size=self.eval_batch_size,
            sampler=EvalSampler(len(dataset)),  # type: ignore[arg-type]
            **self._loader_options(),
        )

    def _loader_options(self) -> dict[str, Any]:
        return {
            # A loader's own generator: creating an iterator then draws nothing from the global
            # RNG, which stays in step with an uninterrupted run across a resume.
            "generator": torch.Generator(),
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }

    def _train_split(self) -> Dataset[tuple[Any, int]]:
        splits = self._splits()
        return splits.whole if self.train_on_whole else splits.train

    def _splits(self) -> Splits:
        self.setup()
        assert self.splits is not None
        return self.splits

    def _require_loader_callback(self) -> None:
        """Under a Trainer, mid-epoch checkpoints are only exact with ResumableLoaderCallback."""
        trainer = self.trainer
        if trainer is not None and not any(
            isinstance(callback, ResumableLoaderCallback) for callback in trainer.callbacks
        ):
            raise ValueError(
                "dynlab train loaders need dynlab.data.sampling.ResumableLoaderCallback() in the "
                "Trainer's callbacks (it records the batches consumed, for exact resume)"
            )


class TrainStatsDataModule(DynlabDataModule):
    """A datamodule of in-memory uint8 images normalised with its train split's per-channel
    statistics and augmented by a random crop (and flip): `load_train_test` calls
    `normalise_by(train)`, `crop()` gives the padding and whether to flip."""

    _normalize: Normalize | None = None

    @abstractmethod
    def crop(self) -> tuple[int, bool]:
        """The augmentation's crop padding (pixels) and whether it flips horizontally."""

    def normalise_by(self, train: TensorImages) -> None:
        self._normalize = Normalize(*channel_stats(train.images))

    def eval_transform(self) -> Normalize:
        assert self._normalize is not None, "load_train_test() first"
        return self._normalize

    def augment_transform(self) -> CropFlip:
        padding, flip = self.crop()
        return CropFlip(self.eval_transform(), padding=padding, flip=flip)


class StreamsLoader(CombinedLoader):
    """Lightning's CombinedLoader of the train streams whose length (batches an epoch: the
    longest stream's) is known before iteration, as for a single loader (schedules use it)."""

    def __len__(self) -> int:
        if self._iterator is None:
            return max(len(loader) for loader in self.flattened)
        return super().__len__()


class _Ordered(torch.utils.data.Sampler[tuple[int, int]]):
    """Every index in order as `(index, 0)`, on every rank (an unsharded, unshuffled stream)."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Any:
        return ((index, 0) for index in range(self.num_samples))
