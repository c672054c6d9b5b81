"""What the supernet's expected cost is made of, measured once on the meta device: output sizes,
each layer's cost per unit width, the post-pool head's cost, and the table of one cost kind."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from dynlab.backbones.fbnetv2.layers import ConvBNAct, FBNetHead, IRBlock
from dynlab.evaluation.macs import count_macs

if TYPE_CHECKING:
    from dynlab.backbones.fbnetv2.supernet import FBNetV2Supernet

COST_KINDS = ("macs", "params")  # what expected_cost can take


def block_sizes(
    resolution: int, stem_stride: int, strides: list[int], kernel: int
) -> dict[str, Any]:
    """The map sizes at one resolution option: the input, the stem's output, each searched
    block's input and output (`kernel` x `kernel` 'same' convs at its stride), the final map."""
    stem_out = out_hw(3, stem_stride, resolution, resolution)
    hw, block_in, block_out = stem_out, [], []
    for stride in strides:
        block_in.append(hw)
        hw = out_hw(kernel, stride, *hw)
        block_out.append(hw)
    return {
        "input": (resolution, resolution),
        "stem_out": stem_out,
        "in": block_in,
        "out": block_out,
        "final": hw,
    }


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

    stem: list[list[int]]  # [geo][stem option] the stem (and the fixed first block) whole
    pw: list[list[tuple[int, int]]]  # [block][geo]
    dw: list[list[list[int]]]  # [block][kernel][geo] per hidden channel
    se: list[list[int]]  # [block][hidden option] the SE of that hidden width and its bottleneck
    pwl: list[list[tuple[int, int]]]  # [block][geo]
    proj: list[list[tuple[int, int]]]  # [block][geo] the skip's 1x1 projection
    head: list[tuple[int, int]]  # [geo] the pre-pool head conv
    post: list[int]  # [head option] the post-pool head


def cost_table(net: FBNetV2Supernet, kind: str) -> CostTable:
    """The `kind` coefficients of every layer of `net` (every resolution option for MACs),
    measured on meta: the stem and the post-pool head whole per width option, the searched
    layers at unit widths."""
    c = net.config
    geos = net._sizes if kind == "macs" else net._sizes[:1]
    stem = []
    for sz in geos:
        row = []
        for width in net.stem_widths:
            with torch.device("meta"):
                layer = ConvBNAct(net.in_chans, width, 3, c["stem_stride"], act="hswish")
                first = None if net.first_spec is None else IRBlock(net.first_spec)
            cost = measure(kind, layer, (net.in_chans, *sz["input"]))
            if first is not None:
                cost += measure(kind, first, (width, *sz["stem_out"]))
            row.append(cost)
        stem.append(row)
    blocks = range(len(net.search_blocks))
    se_w, se_out = unit_layer(kind, "conv_bias", 1, 1, 1, 1)  # on the pooled 1x1 map

    def conv_bn(j: int, key: str, kernel: int = 1, stride: int = 1) -> list[tuple[int, int]]:
        return [unit_layer(kind, "conv_bn", kernel, stride, *sz[key][j]) for sz in geos]

    return CostTable(
        stem=stem,
        pw=[conv_bn(j, "in") for j in blocks],
        dw=[
            [[sum(u) for u in conv_bn(j, "in", k, b.stride)] for k in net.kernels]
            for j, b in enumerate(net.search_blocks)
        ],
        # reduce mid -> s and expand s -> mid, both biased: exact per hidden option, as the
        # bottleneck s = se_width(mid) is a rounded function of mid
        se=[
            [2 * se_w * m * s + se_out * (m + s) for m, s in zip(b.mids, b.se_mids, strict=True)]
            for b in net.search_blocks
        ],
        pwl=[conv_bn(j, "out") for j in blocks],
        proj=[conv_bn(j, "in") for j in blocks],  # 1x1 at stride 1 (skip only there)
        head=[unit_layer(kind, "conv_bn", 1, 1, *sz["final"]) for sz in geos],
        post=[head_cost(kind, net.head_pre, h, net.num_classes) for h in net.head_widths],
    )


def cost_tensors(net: FBNetV2Supernet, t: CostTable, device: torch.device) -> dict[str, Any]:
    """Cost table `t` as float64 tensors on `device`, per searched block with its width options
    and the index pairs of equal widths (what `FBNetV2Supernet.expected_cost` multiplies)."""
    kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
    tensor = lambda v: torch.tensor(v, **kw)  # noqa: E731

    def pairs(a: Sequence[int], b: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        shared = [(i, b.index(w), w) for i, w in enumerate(a) if w in b]
        ia, ib, ws = zip(*shared, strict=True) if shared else ((), (), ())
        index = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        return index(ia), index(ib), tensor(ws)

    return {
        "stem": tensor(t.stem),
        "ins": tensor(net.input_widths),
        "head": tensor(t.head) * float(net.head_pre),
        "post": tensor(t.post),
        "blocks": [
            {
                "pw": tensor(t.pw[j]),
                "dw": tensor(t.dw[j]),
                "se": tensor(t.se[j]),
                "pwl": tensor(t.pwl[j]),
                "proj": tensor(t.proj[j]),
                "outs": tensor(b.outs),
                "mids": tensor(b.mids),
                "in_mid": pairs(b.ins, b.mids),
                "in_out": pairs(b.ins, b.outs),
            }
            for j, b in enumerate(net.search_blocks)
        ],
        "se_on": tensor([float(on) for on in net.se_options]),
    }
