"""Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test 28x28 grey images of 10
kinds of clothing, read from the four IDX files (gzipped or not) under `dataset.root`.

Debian's `dataset-fashion-mnist` package puts them in /usr/share/datasets/fashion-mnist, the
default root. Images are zero-padded to 32x32 (the background is 0, so padding adds background):
every CIFAR backbone, GFNet's patch grid and the resolution searches are built for 32x32 maps.
One channel by default: the images are grey, and three copies would only triple the stem conv's
MACs; `channels: 3` replicates them for a network that insists on RGB.
Augmentation: random crop with 4-pixel zero padding and horizontal flip, as for CIFAR; clothes
are left-right symmetric in kind, so a flip keeps the label.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dynlab.data.base import DataInfo, TensorImages, TrainStatsDataModule
from dynlab.dataset_config import FashionMNISTConfig
from dynlab.errors import DataRootError, require_data_root, where_data_goes

NATIVE_SIZE = 28
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes (the only type these files use)


def find_idx(folder: Path, stem: str) -> Path | None:
    """`stem` or `stem.gz` in `folder` (the plain file first), or None."""
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (LeCun's MNIST format) as a uint8 array of its shape.

    Header: two zero bytes, the type code, the number of dimensions, then each dimension as a
    big-endian int32; the data follows.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise DataRootError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, ">i4", count=ndim, offset=4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataRootError(
            f"{path} holds {body.size} bytes of data but its header says {shape} "
            "(a truncated download?)"
        )
    return body.reshape(shape)


def read_split(images: Path, labels: Path, channels: int, size: int) -> TensorImages:
    """One split as uint8 [N, channels, size, size] (zero-padded from 28x28) and labels [N]."""
    pixels, targets = read_idx(images), read_idx(labels)
    if pixels.ndim != 3 or pixels.shape[1:] != (NATIVE_SIZE, NATIVE_SIZE):
        raise DataRootError(f"{images}: expected N x 28 x 28 images, got {pixels.shape}")
    if targets.shape != (pixels.shape[0],):
        raise DataRootError(f"{labels}: {targets.shape[0]} labels for {pixels.shape[0]} images")
    tensor = torch.from_numpy(pixels.copy()).unsqueeze(1)
    pad = (size - NATIVE_SIZE) // 2
    tensor = F.pad(tensor, (pad, size - NATIVE_SIZE - pad) * 2)
    return TensorImages(
        tensor.expand(-1, channels, -1, -1).contiguous(), torch.from_numpy(targets.astype(np.int64))
    )


class FashionMNISTDataModule(TrainStatsDataModule):
    """Fashion-MNIST at 32x32 (or 28x28), normalised with the train split's statistics."""

    def __init__(
        self,
        *,
        root: str | None,
        channels: int,
        image_size: int,
        val_size: int,
        **common: Any,
    ) -> None:
        super().__init__(root=root, val_size=val_size, **common)
        problem = FashionMNISTConfig.shape_problem(channels, image_size)
        if problem:
            raise ValueError(problem)
        self.channels, self.image_size = channels, image_size
        folder = require_data_root("fashion_mnist", root, FashionMNISTConfig.LAYOUT)
        found = {key: find_idx(folder, stem) for key, stem in FILES.items()}
        missing = [FILES[key] for key, path in found.items() if path is None]
        if missing:
            raise DataRootError(
                f"fashion_mnist: {folder} lacks {', '.join(missing)} (or .gz). "
                f"{where_data_goes(FashionMNISTConfig.LAYOUT)}"
            )
        self.paths: dict[str, Path] = found  # type: ignore[assignment]

    @property
    def info(self) -> DataInfo:
        return DataInfo("fashion_mnist", 10, (self.channels, self.image_size, self.image_size))

    def load_train_test(self) -> tuple[TensorImages, TensorImages]:
        paths, shape = self.paths, (self.channels, self.image_size)
        train = read_split(paths["train_images"], paths["train_labels"], *shape)
        test = read_split(paths["test_images"], paths["test_labels"], *shape)
        self.normalise_by(train)
        return train, test

    def crop(self) -> tuple[int, bool]:
        return 4, True
