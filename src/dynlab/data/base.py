"""What every dynlab DataModule shares: the info the model needs, the held-out split, the loaders.

Each dataset gives its full train set, its test set and two transforms; this base carves the
seeded validation split out of train (used for model selection and for calibrating early-exit
thresholds) and builds resumable train loaders and rank-sharded eval loaders.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from dynlab.data.sampling import (
    EvalSampler,
    ResumableDataLoader,
    ResumableLoaderCallback,
    ResumableSampler,
    SeededDataset,
)
from dynlab.data.transforms import SeededTransform


@dataclass(frozen=True)
class DataInfo:
    """What a model must know about a dataset before any data is loaded."""

    name: str
    num_classes: int
    input_size: tuple[int, int, int]  # (C, H, W)


class DataRootError(FileNotFoundError):
    """The data root or files under it are missing (dynlab never downloads datasets)."""


def require_paths(dataset: str, root: str | Path | None, layout: str, paths: list[str]) -> Path:
    """Check that `paths` exist under `root`; raise DataRootError naming the layout otherwise."""
    how = (
        f"Expected {layout}. Point dynlab at the folder with dataset.root=/path/to/data "
        "(dynlab never downloads datasets)."
    )
    if root is None:
        raise DataRootError(f"{dataset}: dataset.root is not set. {how}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataRootError(f"{dataset}: the data root {root} does not exist. {how}")
    missing = [str(root / path) for path in paths if not (root / path).exists()]
    if missing:
        raise DataRootError(f"{dataset}: missing {', '.join(missing)}. {how}")
    return root


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


def holdout_split(num_samples: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, val) index lists: val is the last `val_size` of a random permutation.

    As MSDNet's loader (Huang et al., ICLR 2018, official code `dataloader.py`).
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_samples, generator=generator).tolist()
    return order[: num_samples - val_size], order[num_samples - val_size :]


@dataclass(frozen=True)
class Splits:
    """The three base datasets, each yielding (untransformed sample, label)."""

    train: Dataset[tuple[Any, int]]
    val: Dataset[tuple[Any, int]]
    test: Dataset[tuple[Any, int]]


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
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1 or None, got {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if val_size < 1:
            raise ValueError(f"val_size must be >= 1 (the held-out split), got {val_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.augment = augment
        self.splits: Splits | None = None

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
        if self.val_size >= num_train:
            raise ValueError(
                f"{self.info.name}: val_size={self.val_size} must be smaller than the "
                f"{num_train} training samples it is held out of"
            )
        train_idx, val_idx = holdout_split(num_train, self.val_size, self.seed)
        self.splits = Splits(Subset(train_full, train_idx), Subset(train_full, val_idx), test)

    def train_dataloader(self) -> ResumableDataLoader:
        """Seeded, sharded, resumable training batches (augmented unless `augment=False`)."""
        self._require_loader_callback()
        train = self._splits().train
        transform = self.augment_transform() if self.augment else self.eval_transform()
        return ResumableDataLoader(
            SeededDataset(train, transform),
            batch_size=self.batch_size,
            sampler=ResumableSampler(len(train), self.seed),  # type: ignore[arg-type]
            **self._loader_options(),
        )

    def val_dataloader(self) -> DataLoader:
        """The held-out split of train with the test-time transform, in dataset order."""
        return self._eval_loader(self._splits().val)

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
