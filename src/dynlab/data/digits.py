"""scikit-learn's bundled 8x8 handwritten digits, upsampled to 32x32: a real task with no files."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from dynlab.data.base import DataInfo, TensorImages, TrainStatsDataModule

IMAGE_SIZE = 32
TEST_FRACTION = 0.2
_TEST_SPLIT_SEED = (
    0  # the test split is fixed, like CIFAR's, so every training seed is compared on it
)
_DIGITS_MAX = 16.0  # load_digits pixels are counts in 0..16


def digits_images(channels: int, size: int = IMAGE_SIZE) -> TensorImages:
    """All 1797 digits as uint8 [N,channels,size,size] (bilinear upsampling, grey replicated)."""
    digits = load_digits()
    small = torch.from_numpy(digits.images).float().unsqueeze(1) / _DIGITS_MAX
    large = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    pixels = (large.clamp(0, 1) * 255).round().to(torch.uint8)
    return TensorImages(
        pixels.expand(-1, channels, -1, -1).contiguous(), torch.from_numpy(digits.target)
    )


def split_train_test(everything: TensorImages) -> tuple[TensorImages, TensorImages]:
    """The fixed (train, test) split of all digits: the same for every run and derived dataset."""
    order = torch.randperm(
        len(everything), generator=torch.Generator().manual_seed(_TEST_SPLIT_SEED)
    )
    num_test = round(TEST_FRACTION * len(everything))
    train_idx, test_idx = order[num_test:], order[:num_test]
    train = TensorImages(everything.images[train_idx], everything.labels[train_idx])
    test = TensorImages(everything.images[test_idx], everything.labels[test_idx])
    return train, test


class DigitsDataModule(TrainStatsDataModule):
    """Digits with a fixed 20 % test split; augmentation is a random crop with 2-pixel padding."""

    def __init__(
        self,
        *,
        root: str | None = None,
        channels: int = 3,
        val_size: int = 200,
        **common: Any,
    ) -> None:
        super().__init__(root=root, val_size=val_size, **common)
        if channels not in (1, 3):
            raise ValueError(f"digits: channels must be 1 or 3, got {channels}")
        self.channels = channels

    @property
    def info(self) -> DataInfo:
        return DataInfo("digits", 10, (self.channels, IMAGE_SIZE, IMAGE_SIZE))

    def load_train_test(self) -> tuple[TensorImages, TensorImages]:
        train, test = split_train_test(digits_images(self.channels))
        self.normalise_by(train)
        return train, test

    def crop(self) -> tuple[int, bool]:
        return 2, False
