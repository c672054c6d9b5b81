"""CIFAR-10 and CIFAR-100 from the standard python-pickle layout under `dataset.root`.

Augmentation and normalisation follow MSDNet's PyTorch loader (Huang et al., ICLR 2018;
kalviny/MSDNet-PyTorch `dataloader.py`, linked from the official Lua code's README): random
crop 32 with 4-pixel zero padding, horizontal flip, per-channel normalisation; 5000 training
images are held out for validation.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynlab.data.base import DataInfo, DynlabDataModule, TensorImages, require_paths
from dynlab.data.transforms import CropFlip, Normalize
from dynlab.dataset_config import CIFAR10Config, CIFAR100Config


def read_cifar_batches(paths: list[Path], label_key: bytes) -> TensorImages:
    """Concatenate pickled CIFAR batches ({b'data': uint8 [N,3072], label_key: [N]})."""
    images, labels = [], []
    for path in paths:
        with path.open("rb") as file:
            batch = pickle.load(file, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return TensorImages(
        torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
    )


class _CifarDataModule(DynlabDataModule):
    """The shared CIFAR pipeline; subclasses name the folder, files, label key and statistics."""

    name: str
    num_classes: int
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str

    def __init__(
        self,
        *,
        root: str | None,
        val_size: int = 5000,
        **common: Any,
    ) -> None:
        super().__init__(root=root, val_size=val_size, **common)
        files = [f"{self.folder}/{name}" for name in self.train_files + self.test_files]
        self.data_dir = require_paths(self.name, self.root, self.layout, files) / self.folder
        self._normalize = Normalize(self.mean, self.std)

    @property
    def info(self) -> DataInfo:
        return DataInfo(self.name, self.num_classes, (3, 32, 32))

    def load_train_test(self) -> tuple[TensorImages, TensorImages]:
        train = read_cifar_batches(
            [self.data_dir / name for name in self.train_files], self.label_key
        )
        test = read_cifar_batches(
            [self.data_dir / name for name in self.test_files], self.label_key
        )
        return train, test

    def eval_transform(self) -> Normalize:
        return self._normalize

    def augment_transform(self) -> CropFlip:
        return CropFlip(self._normalize, padding=4, flip=True)


class CIFAR10DataModule(_CifarDataModule):
    """CIFAR-10: `<root>/cifar-10-batches-py/data_batch_1..5, test_batch`."""

    name, num_classes, folder = "cifar10", 10, "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = b"labels"
    # kalviny/MSDNet-PyTorch dataloader.py
    mean, std = (0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616)
    layout = CIFAR10Config.LAYOUT


class CIFAR100DataModule(_CifarDataModule):
    """CIFAR-100 (fine labels): `<root>/cifar-100-python/train, test`."""

    name, num_classes, folder = "cifar100", 100, "cifar-100-python"
    train_files, test_files = ("train",), ("test",)
    label_key = b"fine_labels"
    # kalviny/MSDNet-PyTorch dataloader.py
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    layout = CIFAR100Config.LAYOUT
