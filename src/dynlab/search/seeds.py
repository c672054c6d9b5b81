"""Independent, reproducible seeds for the streams of a search (candidates, sampler, controller)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def derived_seed(seed: int, *keys: int) -> int:
    """An independent seed for the stream named by `keys` (e.g. candidate k: keys (0, k))."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's global RNG (CPU and CUDA) seeded by `seed`, then put it back."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
