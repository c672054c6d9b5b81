"""BatchNorm recalibration: fresh running statistics from a fixed training subset.

A candidate taken out of a supernet (SPOS) carries BN statistics accumulated over many other
paths; before scoring, they are recomputed on training batches, in train mode, without gradients.
SPOS's official search (megvii-model/SinglePathOneShot, `src/Search/tester.py`) resets the
running stats and forwards 200 augmented training batches with BatchNorm's default moving average
(momentum 0.1), so its statistics weight the last batches most. dynlab uses the exact mean over
the batches instead (`momentum=None`): the same batches give the same statistics in any order, an
improvement kept on purpose.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import Tensor, nn

from dynlab.evaluation.outputs import module_device


def recalibrate_bn(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_batches: int | None = None
) -> int:
    """Recompute every BatchNorm's running mean/var over (the first `num_batches` of) `batches`
    as an exact average; returns the number of batches used. Weights are untouched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    modes = [(m, m.training) for m in model.modules()]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over the batches seen
    device, used = module_device(model), 0
    forward = getattr(model, "forward_exits", model)
    model.train()
    try:
        with torch.no_grad():
            for x, _ in islice(batches, num_batches):
                forward(x.to(device))
                used += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    if used == 0:
        raise ValueError("BN recalibration got no batches")
    return used
