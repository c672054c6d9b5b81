"""Tiny random datasets on disk in the real CIFAR, ImageNet and Fashion-MNIST layouts, for tests
and try-outs."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

_CIFAR100_COARSE_CLASSES = 20


def _write_pickle(path: Path, content: dict[bytes, object]) -> None:
    with path.open("wb") as file:
        pickle.dump(content, file, protocol=2)  # the protocol of the published CIFAR pickles


def write_fake_cifar(
    root: str | Path, num_classes: int = 10, num_train: int = 100, num_test: int = 50, seed: int = 0
) -> Path:
    """Write random images in the CIFAR-10 (`cifar-10-batches-py/`) or CIFAR-100
    (`cifar-100-python/`) pickle layout under `root`; return `root`, the `dataset.root` to use."""
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    if num_train < 5 or num_test < 1:
        raise ValueError(f"need num_train >= 5 and num_test >= 1, got {num_train}, {num_test}")
    rng = np.random.default_rng(seed)

    def split(size: int) -> tuple[np.ndarray, list[int]]:
        data = rng.integers(0, 256, size=(size, 3 * 32 * 32), dtype=np.uint8)
        return data, rng.integers(0, num_classes, size=size).tolist()

    root = Path(root)
    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        sizes = [num_train // 5 + (i < num_train % 5) for i in range(5)]
        for i, size in enumerate(sizes, start=1):
            data, labels = split(size)
            _write_pickle(folder / f"data_batch_{i}", {b"data": data, b"labels": labels})
        data, labels = split(num_test)
        _write_pickle(folder / "test_batch", {b"data": data, b"labels": labels})
        meta = {
            b"label_names": [f"class_{k}".encode() for k in range(10)],
            b"num_cases_per_batch": sizes[0],
            b"num_vis": 3 * 32 * 32,
        }
        _write_pickle(folder / "batches.meta", meta)
        return root

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in [("train", num_train), ("test", num_test)]:
        data, fine = split(size)
        coarse = [label % _CIFAR100_COARSE_CLASSES for label in fine]
        content = {b"data": data, b"fine_labels": fine, b"coarse_labels": coarse}
        _write_pickle(folder / name, content)
    meta = {
        b"fine_label_names": [f"fine_{k}".encode() for k in range(100)],
        b"coarse_label_names": [f"coarse_{k}".encode() for k in range(_CIFAR100_COARSE_CLASSES)],
    }
    _write_pickle(folder / "meta", meta)
    return root


def write_fake_imagenet(
    root: str | Path,
    num_classes: int = 4,
    per_class_train: int = 6,
    per_class_val: int = 2,
    size: int = 40,
    seed: int = 0,
) -> Path:
    """Write random RGB PNGs as `root/train/<wnid>/*.png` and `root/val/<wnid>/*.png`; return `root`."""
    if min(num_classes, per_class_train, per_class_val, size) < 1:
        raise ValueError("num_classes, per_class_train, per_class_val and size must be >= 1")
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, per_class in [("train", per_class_train), ("val", per_class_val)]:
        for k in range(num_classes):
            folder = root / split / f"n{k:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{split}_{k}_{i}.png")
    return root


def write_idx(path: str | Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write a uint8 array as an IDX file (LeCun's MNIST format), gzipped when `compress`."""
    if array.dtype != np.uint8:
        raise ValueError(f"IDX files here hold uint8, got {array.dtype}")
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    content = header + array.tobytes()
    path = Path(path)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(content))
    else:
        path.write_bytes(content)
    return path


def write_fake_fashion_mnist(
    root: str | Path, num_train: int = 100, num_test: int = 50, compress: bool = True, seed: int = 0
) -> Path:
    """Write random 28x28 images and labels as Fashion-MNIST's four IDX files under `root`;
    return `root`, the `dataset.root` to use."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, size in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, size=(size, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=size, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return root
