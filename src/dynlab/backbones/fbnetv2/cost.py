"""What the supernet's expected cost is made of, measured once on the meta device: output sizes,
each layer's cost per unit width, the post-pool head's cost, and the table of one cost kind."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn

from dynlab.backbones.fbnetv2.layers import ConvBNAct, FBNetHead
from dynlab.evaluation.macs import count_macs

COST_KINDS = ("macs", "params")  # what expected_cost can take


@functools.lru_cache(maxsize=4096)
def out_hw(kernel: int, stride: int, h: int, w: int) -> tuple[int, int]:
    """Output size of a `kernel` x `kernel` 'same'-padded conv at `stride` on h x w (meta run)."""
    with torch.device("meta"):
        y = nn.Conv2d(1, 1, kernel, stride, kernel // 2, bias=False)(torch.empty(1, 1, h, w))
    return int(y.shape[-2]), int(y.shape[-1])


def measure(kind: str, module: nn.Module, size: tuple[int, int, int]) -> int:
    """The `kind` cost of `module` (built on meta) on one (C, H, W) input: its count_macs for
    "macs", its parameter count (weights, biases, BN affines) for "params"."""
    if kind == "macs":
        return count_macs(module, size)
    return sum(p.numel() for p in module.parameters())


@functools.lru_cache(maxsize=4096)
def unit_layer(kind: str, layer: str, kernel: int, stride: int, h: int, w: int) -> tuple[int, int]:
    """A layer's `kind` cost per C_in x C_out / groups (its weight) and per output channel (BN
    affine, bias), measured on one-channel copies on h x w inputs: `layer` "conv_bn" is ConvBNAct,
    "conv_bias" a biased Conv2d (SE). A depthwise layer costs their sum per channel."""
    with torch.device("meta"):
        weight = nn.Conv2d(1, 1, kernel, stride, kernel // 2, bias=False)
        if layer == "conv_bn":
            whole: nn.Module = ConvBNAct(1, 1, kernel, stride)
        elif layer == "conv_bias":
            whole = nn.Conv2d(1, 1, kernel, stride, kernel // 2)
        else:
            raise ValueError(f"unknown unit layer {layer!r}")
    unit = measure(kind, weight, (1, h, w))
    return unit, measure(kind, whole, (1, h, w)) - unit


@functools.lru_cache(maxsize=64)
def head_cost(kind: str, in_channels: int, width: int, num_classes: int) -> int:
    """The `kind` cost of the post-pool FBNetHead (1x1 conv, classifier), measured on meta."""
    with torch.device("meta"):
        head = FBNetHead(in_channels, width, num_classes, 0.0)
    return measure(kind, head, (in_channels, 1, 1))


class CostTable(NamedTuple):
    """One cost kind's measured coefficients. Rows run over geometries: every resolution option
    for MACs, one for parameters (no input size changes them). Pairs are (per C_in x C_out, per
    C_out) of a ConvBNAct (see `unit_layer`)."""

    fixed: list[int]  # [geo] the stem and the fixed first block at their widths
    pw: list[list[tuple[int, int]]]  # [block][geo]
    dw: list[list[list[int]]]  # [block][kernel][geo] per hidden channel
    se: list[list[int]]  # [block][expansion] the SE of that hidden width and its bottleneck
    pwl: list[list[tuple[int, int]]]  # [block][geo]
    head: list[tuple[int, int]]  # [geo] the pre-pool head conv
