"""Cluttered digits: each 8x8 digit upsampled and placed at random on a larger canvas among
fragments of other digits, after the cluttered MNIST of Mnih et al. 2014 ("Recurrent Models of
Visual Attention"). Most of the canvas is irrelevant, so where a model looks matters (GFNet).

The train/test split is digits' fixed split; clutter is cut from digits of the same split only.
The canvases are fixed (a module seed, not the run seed), like digits' test split.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dynlab.data.base import DataInfo, TensorImages, TrainStatsDataModule
from dynlab.data.digits import digits_images, split_train_test
from dynlab.dataset_config import ClutteredDigitsConfig

_CLUTTER_SEED = 2014  # the canvases are the same for every run, so every seed sees one dataset
_SPLIT_STREAMS = {"train": 0, "test": 1}  # each split draws from its own stream of that seed


def clutter_canvases(
    digits: Tensor,
    canvas_size: int,
    clutter: int,
    fragment_size: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Place each digit of uint8 [N,1,d,d] at random on a canvas, add `clutter` fragments of other
    digits of `digits`; composed by pixel-wise max. Returns (uint8 [N,1,S,S], top-left [N,2])."""
    num, size = digits.shape[0], digits.shape[-1]
    images = digits[:, 0]
    canvases = torch.zeros(num, canvas_size, canvas_size, dtype=torch.uint8)
    rows = torch.arange(num).view(-1, 1, 1)
    positions = torch.randint(0, canvas_size - size + 1, (num, 2), generator=generator)
    _paste(canvases, rows, positions, images)
    for _ in range(clutter if num > 1 else 0):
        # Another digit (never the sample's own: an offset in 1..N-1), a random fragment of it.
        source = (torch.arange(num) + torch.randint(1, num, (num,), generator=generator)) % num
        cut = torch.randint(0, size - fragment_size + 1, (num, 2), generator=generator)
        fragments = _crop(images[source], cut, fragment_size)
        where = torch.randint(0, canvas_size - fragment_size + 1, (num, 2), generator=generator)
        _paste(canvases, rows, where, fragments)
    return canvases.unsqueeze(1), positions


def _window(origins: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Row and column index grids [N,size,1] and [N,1,size] of windows at `origins` [N,2]."""
    offsets = torch.arange(size)
    return (origins[:, :1] + offsets).unsqueeze(2), (origins[:, 1:] + offsets).unsqueeze(1)


def _crop(images: Tensor, origins: Tensor, size: int) -> Tensor:
    """The size x size windows of images [N,H,W] at `origins` [N,2]."""
    r, c = _window(origins, size)
    return images[torch.arange(images.shape[0]).view(-1, 1, 1), r, c]


def _paste(canvases: Tensor, rows: Tensor, origins: Tensor, patches: Tensor) -> None:
    """Max-compose patches [N,k,k] into canvases [N,S,S] at `origins` [N,2], in place."""
    r, c = _window(origins, patches.shape[-1])
    canvases[rows, r, c] = torch.maximum(canvases[rows, r, c], patches)


class ClutteredDigitsDataModule(TrainStatsDataModule):
    """Cluttered digits with digits' fixed 20 % test split; augmentation is a random crop.

    `positions[split]` holds each canvas's digit top-left (row, col), split "train" or "test";
    the validation samples are `splits.val.indices` of "train".
    """

    def __init__(
        self,
        *,
        canvas_size: int = 64,
        digit_size: int = 24,
        clutter: int = 4,
        fragment_size: int = 8,
        channels: int = 3,
        val_size: int = 200,
        root: str | None = None,
        **common: Any,
    ) -> None:
        super().__init__(root=root, val_size=val_size, **common)
        problem = ClutteredDigitsConfig.range_problem(
            canvas_size, digit_size, fragment_size, clutter, channels
        )
        if problem:
            raise ValueError(problem)
        self.canvas_size, self.digit_size = canvas_size, digit_size
        self.clutter, self.fragment_size, self.channels = clutter, fragment_size, channels
        self.positions: dict[str, Tensor] = {}

    @property
    def info(self) -> DataInfo:
        return DataInfo("cluttered_digits", 10, (self.channels, self.canvas_size, self.canvas_size))

    def digit_boxes(self, split: str) -> Tensor:
        """Each canvas's digit box (top, left, bottom, right), exclusive ends, of "train"/"test"."""
        if split not in self.positions:
            raise ValueError(
                f"digit_boxes: split must be 'train' or 'test' (after setup), got {split!r}"
            )
        top_left = self.positions[split]
        return torch.cat([top_left, top_left + self.digit_size], dim=1)

    def load_train_test(self) -> tuple[TensorImages, TensorImages]:
        train, test = split_train_test(digits_images(1, self.digit_size))
        out: dict[str, TensorImages] = {}
        for split, digits in (("train", train), ("test", test)):
            generator = torch.Generator().manual_seed(_CLUTTER_SEED + _SPLIT_STREAMS[split])
            canvases, self.positions[split] = clutter_canvases(
                digits.images, self.canvas_size, self.clutter, self.fragment_size, generator
            )
            images = canvases.expand(-1, self.channels, -1, -1).contiguous()
            out[split] = TensorImages(images, digits.labels)
        self.normalise_by(out["train"])
        return out["train"], out["test"]

    def crop(self) -> tuple[int, bool]:
        return self.canvas_size // 16, False
