"""Optimisers and learning-rate schedules built from config, shared by every phase and search.

`build_optimizer` turns an `OptimConfig` into a torch optimiser over named parameters: parameter
groups by name pattern (own lr / weight decay), norm weights and biases without weight decay.
`lr_lambda` is the per-step multiplier of the base lr: linear warm-up, then cosine, step, linear
decay or constant. Candidate training in `dynlab.search` and the fit phases use the same two.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from dynlab.config import OptimConfig, OptimizerName, ScheduleName

NamedParams = list[tuple[str, nn.Parameter]]


def _sgd(groups: list[dict[str, Any]], o: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)


def _adam(groups: list[dict[str, Any]], o: OptimConfig) -> torch.optim.Optimizer:
    # Adam's weight decay is the coupled L2 term (GFNet's PPO and FBNetV2's arch optimiser).
    return torch.optim.Adam(groups, lr=o.lr, betas=tuple(o.betas))


def _adamw(groups: list[dict[str, Any]], o: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


OPTIMIZERS: dict[
    OptimizerName, Callable[[list[dict[str, Any]], OptimConfig], torch.optim.Optimizer]
]
OPTIMIZERS = {OptimizerName.sgd: _sgd, OptimizerName.adam: _adam, OptimizerName.adamw: _adamw}


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a parameter name matches any fnmatch pattern (`model.classifier.*`)."""
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def select_parameters(named: NamedParams, patterns: Iterable[str]) -> NamedParams:
    """The parameters whose names match any of `patterns`."""
    patterns = list(patterns)
    return [(n, p) for n, p in named if matches(n, patterns)]


def build_optimizer(
    root: nn.Module, named: NamedParams, optim: OptimConfig
) -> torch.optim.Optimizer:
    """The optimiser `optim.name` over `named`, grouped by `parameter_groups`."""
    if not named:
        raise ValueError(
            f"optimiser {optim.name} has no parameters to optimise (params={list(optim.params)}): "
            "check the phase's optimisers.<name>.params and freeze patterns"
        )
    return OPTIMIZERS[OptimizerName(optim.name)](parameter_groups(root, named, optim), optim)


def parameter_groups(
    root: nn.Module, named: NamedParams, optim: OptimConfig
) -> list[dict[str, Any]]:
    """Torch parameter groups: each `optim.groups` entry (first match wins) and the rest, each
    split into decayed weights and, with `no_decay_norm_and_bias`, norm weights + biases at 0.

    Every group carries its base `lr`, so schedules scale each group's own learning rate.
    """
    norm_params = {
        id(p)
        for m in root.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
        for p in m.parameters(recurse=False)
    }
    buckets: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in named:
        group = next((g for g in optim.groups if fnmatchcase(name, g.pattern)), None)
        lr = optim.lr if group is None or group.lr is None else group.lr
        wd = (
            optim.weight_decay
            if group is None or group.weight_decay is None
            else group.weight_decay
        )
        if optim.no_decay_norm_and_bias and (id(p) in norm_params or name.endswith(".bias")):
            wd = 0.0
        buckets.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in buckets.items()]


# After warm-up, the multiplier as a function of (progress in [0, 1], milestones passed, config).
SCHEDULES: dict[ScheduleName, Callable[[float, int, OptimConfig], float]] = {
    ScheduleName.cosine: lambda progress, _, o: 0.5 * (1.0 + math.cos(math.pi * progress)),
    ScheduleName.linear: lambda progress, _, o: 1.0 - progress,
    ScheduleName.step: lambda _, passed, o: o.gamma**passed,
    ScheduleName.constant: lambda progress, _, o: 1.0,
}


def lr_lambda(
    optim: OptimConfig, total_steps: int, steps_per_epoch: float
) -> Callable[[int], float]:
    """Multiplier of each group's base lr at optimiser step `step` (0-based): linear warm-up over
    `warmup_epochs`, then the schedule over the remaining steps (step milestones are fractions of
    all `total_steps`); with `per_epoch`, held at its value at each epoch's first step."""
    warmup = int(optim.warmup_epochs * steps_per_epoch)
    milestones = [int(m * total_steps) for m in optim.milestones]
    after_warmup = SCHEDULES[ScheduleName(optim.schedule)]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.per_epoch:  # the value at the start of the step's epoch
            step = max(warmup, int(step // steps_per_epoch * steps_per_epoch))
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return after_warmup(progress, sum(step >= m for m in milestones), optim)

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int, steps_per_epoch: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR over `lr_lambda` (stepped once per optimiser step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(optim, max(1, total_steps), steps_per_epoch)
    )
