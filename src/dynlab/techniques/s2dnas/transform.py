"""The S2D transformation: which channels each stage owns and reads, and the layers swapped in.

Channels of a C-channel layer are cut into G groups, group g being channels [g*C//G, (g+1)*C//G)
(floor rounding, so every group has C//G or C//G + 1 channels and every stage is non-empty when
C >= G). Stage k owns the groups between its layer group's split points k-1 and k. A dense conv of
stage k reads its own input slice and the slices of the earlier stages j its layer group's
indicator matrix marks (m_kj = 1); the last conv of the network reads every earlier stage (S2DNAS,
Sec. 3: every exit sees features built from all earlier stages).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dynlab.techniques.s2dnas.analysis import BackboneLayout
from dynlab.techniques.s2dnas.layers import (
    Bounds,
    StageCursor,
    StagedBatchNorm2d,
    StagedConv2d,
    StagedDepthwiseConv2d,
)
from dynlab.techniques.s2dnas.settings import S2DSettings, SettingsError


def stage_bounds(channels: int, split_points: Sequence[int], groups: int) -> tuple[Bounds, ...]:
    """The (start, stop) channel range of every stage in a layer of `channels` channels."""
    cuts = [0, *(p * channels // groups for p in split_points), channels]
    return tuple(zip(cuts[:-1], cuts[1:], strict=True))


@dataclass(frozen=True)
class ConvPlan:
    """What one conv computes at every stage."""

    out_bounds: tuple[Bounds, ...]
    in_bounds: tuple[Bounds, ...] | None  # None: reads the network input whole
    reads: tuple[tuple[int, ...], ...]  # per stage k, the earlier stages (0-based) it also reads
    depthwise: bool


@dataclass(frozen=True)
class StagePlan:
    """The transformation of a whole backbone under one set of settings."""

    convs: dict[str, ConvPlan]
    norms: dict[str, tuple[Bounds, ...]]
    out_bounds: tuple[Bounds, ...]  # stage slices of the last feature map


def plan_stages(layout: BackboneLayout, settings: S2DSettings, groups: int) -> StagePlan:
    """Stage slices of every layer of `layout` under `settings` with G = `groups`."""
    settings.validate(settings.num_stages, layout.num_layer_groups, groups)

    def bounds(name: str, channels: int, layer_group: int) -> tuple[Bounds, ...]:
        if channels < groups:
            raise SettingsError(
                f"{layout.backbone}: layer '{name}' has {channels} channels, fewer than "
                f"groups={groups}; lower `groups` so every stage keeps at least one channel"
            )
        return stage_bounds(channels, settings.split_points[layer_group], groups)

    last = layout.convs[-1]
    # the last conv, with every branch of its block when it is one (ACNet, RepVGG)
    final = {
        c.name
        for c in layout.convs
        if c.name == last.name or (last.block and c.block == last.block)
    }
    convs = {}
    for conv in layout.convs:
        reads = tuple(
            tuple(range(k)) if conv.name in final else settings.reads(conv.out_group, k)
            for k in range(settings.num_stages)
        )
        in_bounds = None if conv.reads_image else bounds(conv.name, conv.in_channels, conv.in_group)
        convs[conv.name] = ConvPlan(
            out_bounds=bounds(conv.name, conv.out_channels, conv.out_group),
            in_bounds=in_bounds,
            reads=reads,
            depthwise=conv.depthwise,
        )
    norms = {n.name: bounds(n.name, n.channels, n.group) for n in layout.norms}
    out_bounds = bounds("forward_features output", layout.out_channels, layout.out_group)
    return StagePlan(convs=convs, norms=norms, out_bounds=out_bounds)


def stage_backbone(
    net: nn.Module, layout: BackboneLayout, plan: StagePlan, cursor: StageCursor
) -> None:
    """Swap every Conv2d / BatchNorm2d of `forward_features` for its staged version, in place.

    The staged layers start from the original weights (sliced into per-stage blocks), so a backbone
    loaded with trained static weights gives a network initialised from them.
    """
    modules = dict(net.named_modules())
    for index, conv in enumerate(layout.convs):
        p = plan.convs[conv.name]
        original = modules[conv.name]
        assert isinstance(original, nn.Conv2d)
        staged: nn.Module
        if p.depthwise:
            staged = StagedDepthwiseConv2d(original, cursor, p.out_bounds)
        else:
            staged = StagedConv2d(original, index, cursor, p.out_bounds, p.in_bounds, p.reads)
        _replace(net, conv.name, staged)
    for name, bounds in plan.norms.items():
        original = modules[name]
        assert isinstance(original, nn.BatchNorm2d)
        _replace(net, name, StagedBatchNorm2d(original, cursor, bounds))


@torch.no_grad()
def mask_to_plan(net: nn.Module, layout: BackboneLayout, plan: StagePlan) -> None:
    """Zero, in place, the weights of the original `net` that no stage reads under `plan`.

    The staged network then computes exactly this masked network: its stages' last feature maps,
    concatenated, equal the masked network's (how the transformation is verified at build time).
    """
    modules = dict(net.named_modules())
    for conv in layout.convs:
        p = plan.convs[conv.name]
        if p.depthwise or p.in_bounds is None:
            continue
        weight = modules[conv.name].weight
        mask = torch.zeros_like(weight)
        for k, (lo, hi) in enumerate(p.out_bounds):
            for start, stop in [p.in_bounds[j] for j in p.reads[k]] + [p.in_bounds[k]]:
                mask[lo:hi, start:stop] = 1
        weight.mul_(mask)


def _replace(net: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, child, module)
