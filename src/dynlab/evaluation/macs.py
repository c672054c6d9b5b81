"""Multiply-accumulates per sample, measured with torch's own flop counter (no hand-kept tables)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from dynlab.evaluation.outputs import evaluating, module_device


def count_macs(
    model_or_fn: nn.Module | Callable[[Tensor], object],
    input_size: tuple[int, int, int],
    *,
    module: nn.Module | None = None,
) -> int:
    """MACs of one batch-1 forward of `model_or_fn` on an input of shape (C, H, W).

    `model_or_fn` is a module or any callable on a batch (e.g. "run stages 1..k"); the module
    that owns it (`module`, else the callable's bound `__self__`) gives the device and is run in
    eval mode under no_grad, its training flags restored afterwards. FlopCounterMode counts 2 flops
    per multiply-accumulate of the conv/matmul ops it knows, so MACs = flops / 2.
    """
    if len(input_size) != 3 or not all(isinstance(d, int) and d > 0 for d in input_size):
        raise ValueError(f"input_size must be three positive ints (C, H, W), got {input_size!r}")
    owner = model_or_fn if isinstance(model_or_fn, nn.Module) else module
    if owner is None and isinstance(getattr(model_or_fn, "__self__", None), nn.Module):
        owner = model_or_fn.__self__  # type: ignore[union-attr]
    device = module_device(owner) if owner is not None else torch.device("cpu")
    x = torch.zeros(1, *input_size, device=device)
    counter = FlopCounterMode(display=False)
    with evaluating(owner) if owner is not None else torch.no_grad(), counter:
        model_or_fn(x)
    return counter.get_total_flops() // 2
