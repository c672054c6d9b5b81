"""Per-sample transforms whose randomness comes only from an integer seed.

Every transform is called as `transform(sample, seed)`; the sampler picks the seed from
(seed, epoch, index), so augmentation is the same whatever the worker count, the rank count
or how often the process restarted.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class SeededTransform(Protocol):
    """A sample transform whose randomness is fully determined by `seed`."""

    def __call__(self, sample: Any, seed: int) -> Tensor: ...


class Normalize:
    """uint8 [C,H,W] image to float, scaled to [0, 1] then standardised per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: Tensor, seed: int = 0) -> Tensor:
        return (image.float() / 255.0 - self.mean) / self.std


class CropFlip:
    """Random crop of the zero-padded uint8 image back to its size, optional horizontal flip.

    The tensor twin of torchvision's RandomCrop(size, padding) + RandomHorizontalFlip, drawing
    from a generator seeded by `seed`, then normalising.
    """

    def __init__(self, normalize: Normalize, padding: int, flip: bool) -> None:
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.normalize, self.padding, self.flip = normalize, padding, flip

    def __call__(self, image: Tensor, seed: int) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        height, width = image.shape[-2:]
        pad = self.padding
        top, left = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
        image = F.pad(image, (pad, pad, pad, pad))[:, top : top + height, left : left + width]
        if self.flip and torch.rand((), generator=generator) < 0.5:
            image = image.flip(-1)
        return self.normalize(image)


class Seeded:
    """Runs a pipeline that draws from the global RNGs (torchvision draws from torch's; timm's
    RandomResizedCrop, RandAugment and random erasing from Python's `random` and numpy's too) with
    all three seeded from `seed`, so the sample depends on `seed` alone: the same whatever ran
    before it, in whichever worker, before or after a resume.

    Every state is restored afterwards, so the caller's random streams are left untouched.
    """

    def __init__(self, transform: Callable[[Any], Tensor]) -> None:
        self.transform = transform

    def __call__(self, sample: Any, seed: int) -> Tensor:
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed % 2**32)
                torch.random.default_generator.manual_seed(seed)
                return self.transform(sample)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class Deterministic:
    """Wraps a transform without randomness (an eval pipeline) so it takes and ignores `seed`."""

    def __init__(self, transform: Callable[[Any], Tensor]) -> None:
        self.transform = transform

    def __call__(self, sample: Any, seed: int = 0) -> Tensor:
        return self.transform(sample)


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images [N,C,H,W] on the [0, 1] scale."""
    pixels = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255.0
    return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).clamp_min(1e-6).tolist())
