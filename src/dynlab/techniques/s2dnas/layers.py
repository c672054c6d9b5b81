"""Stage-aware Conv2d and BatchNorm2d: the layers that make one backbone compute stage by stage.

The S2D network runs the backbone's own `forward_features` once per stage. While stage k runs,
every feature map holds only stage k's channel slice; the staged layers read which stage is running
from a `StageCursor` shared by all of them, and keep the inputs later stages reuse in its `StageRun`
(earlier stages are never recomputed). Everything else in the backbone (activations, pooling,
residual additions) is channel-local and works on the slices unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from dynlab.nn.fuse import register_conv_bn_fuser
from dynlab.nn.reparam import (
    MultiBranch,
    identity_kernel,
    merged_kernel,
    place_kernels,
    register_branch_merger,
)

Bounds = tuple[int, int]


class StageRun:
    """One batch going through the stages: its image, the next stage, and what later stages reuse."""

    def __init__(self, image: Tensor) -> None:
        self.image = image
        self.stage = 0
        # conv index -> {earlier stage -> its input there}, kept where a later stage reads it
        self.conv_inputs: dict[int, dict[int, Tensor]] = {}
        self.pooled: list[Tensor] = []  # pooled last feature map of every finished stage

    def keep(self, mask: Tensor) -> None:
        """Drop the samples where `mask` is False from the image and from every kept tensor."""
        self.image = self.image[mask]
        self.conv_inputs = {
            i: {k: t[mask] for k, t in kept.items()} for i, kept in self.conv_inputs.items()
        }
        self.pooled = [p[mask] for p in self.pooled]


class StageCursor:
    """Shared by the staged layers of one network: the run in progress (None outside a stage)."""

    def __init__(self) -> None:
        self.run: StageRun | None = None

    def current(self) -> StageRun:
        if self.run is None:
            raise RuntimeError(
                "a staged layer ran outside S2DNet; call the S2D network, not its backbone"
            )
        return self.run


def stage_input(
    conv_inputs: dict[int, dict[int, Tensor]],
    index: int,
    x: Tensor,
    reads: tuple[int, ...],
    stage: int,
    keep: bool,
) -> Tensor:
    """What conv `index` reads at `stage`: the inputs it had at the earlier stages `reads` (the
    indicator matrix's ones), then its input `x`, concatenated; `keep` stores `x` for the later
    stages that read this one."""
    kept = conv_inputs.setdefault(index, {})
    inputs = torch.cat([*(kept[j] for j in reads), x], dim=1) if reads else x
    if keep:
        kept[stage] = x
    return inputs


class StageAttributes:
    """The tensors one stage program reads, registered as buffers of `holder` under unique names
    (`prefix` names the layer being converted)."""

    def __init__(self, holder: nn.Module, prefix: str) -> None:
        self.holder, self.prefix = holder, prefix

    def get(self, graph: fx.Graph, name: str, tensor: Tensor) -> fx.Node:
        target = f"{self.prefix}_{name}"
        self.holder.register_buffer(target, tensor.detach().contiguous())
        return graph.get_attr(target)


class StagedConv2d(nn.Module):
    """A dense conv cut into per-stage weight blocks: stage k computes its output slice from the
    input slices of the earlier stages it reads (`reads[k]`) and its own, concatenated in that
    order (only live blocks are kept)."""

    def __init__(
        self,
        conv: nn.Conv2d,
        index: int,
        cursor: StageCursor,
        out_bounds: Sequence[Bounds],
        in_bounds: Sequence[Bounds] | None,
        reads: Sequence[Sequence[int]],
    ) -> None:
        """`in_bounds` None: the conv reads the network input, whole, at every stage."""
        super().__init__()
        self.index, self.cursor, self.out_bounds = index, cursor, list(out_bounds)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.reads = [tuple(r) for r in reads]
        self.reads_image = in_bounds is None
        # Stage k's input must be kept if a later stage reads it.
        stages = len(out_bounds)
        self.keep_for_later = [
            any(k in self.reads[i] for i in range(k + 1, stages)) for k in range(stages)
        ]
        weight = conv.weight.detach()
        blocks, biases = [], []
        for k, (lo, hi) in enumerate(out_bounds):
            columns = (
                [(0, conv.in_channels)]
                if in_bounds is None
                else [in_bounds[j] for j in self.reads[k]] + [in_bounds[k]]
            )
            block = torch.cat([weight[lo:hi, start:stop] for start, stop in columns], dim=1)
            blocks.append(nn.Parameter(block.clone()))
            if conv.bias is not None:
                biases.append(nn.Parameter(conv.bias.detach()[lo:hi].clone()))
        self.weights = nn.ParameterList(blocks)
        self.biases = nn.ParameterList(biases) if biases else None

    def forward(self, x: Tensor) -> Tensor:
        run = self.cursor.current()
        k = run.stage
        inputs = x
        if not self.reads_image:
            inputs = stage_input(
                run.conv_inputs, self.index, x, self.reads[k], k, self.keep_for_later[k]
            )
        bias = self.biases[k] if self.biases is not None else None
        return F.conv2d(inputs, self.weights[k], bias, self.stride, self.padding, self.dilation)

    def stage_node(
        self, graph: fx.Graph, x: fx.Node, conv_inputs: fx.Node, k: int, attrs: StageAttributes
    ) -> fx.Node:
        """Stage k of this conv as plain graph nodes: `stage_input` (if it reads earlier stages or
        keeps its input) and F.conv2d on stage k's weight block."""
        inputs: fx.Node = x
        if not self.reads_image and (self.reads[k] or self.keep_for_later[k]):
            args = (conv_inputs, self.index, x, self.reads[k], k, self.keep_for_later[k])
            inputs = graph.call_function(stage_input, args)
        weight = attrs.get(graph, "weight", self.weights[k])
        bias = attrs.get(graph, "bias", self.biases[k]) if self.biases is not None else None
        args = (inputs, weight, bias, self.stride, self.padding, self.dilation)
        return graph.call_function(F.conv2d, args)


class StagedDepthwiseConv2d(nn.Module):
    """A depthwise conv: channel c only reads channel c, so stage k maps its slice to its slice and
    never reads other stages (a concat bit does not apply to it)."""

    def __init__(self, conv: nn.Conv2d, cursor: StageCursor, bounds: Sequence[Bounds]) -> None:
        super().__init__()
        self.cursor, self.bounds = cursor, list(bounds)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        lo, hi = self.bounds[self.cursor.current().stage]
        bias = self.bias[lo:hi] if self.bias is not None else None
        return F.conv2d(
            x, self.weight[lo:hi], bias, self.stride, self.padding, self.dilation, hi - lo
        )

    def stage_node(
        self, graph: fx.Graph, x: fx.Node, conv_inputs: fx.Node, k: int, attrs: StageAttributes
    ) -> fx.Node:
        """Stage k of this conv as one F.conv2d node on its channel slice of the filters."""
        lo, hi = self.bounds[k]
        weight = attrs.get(graph, "weight", self.weight[lo:hi])
        bias = attrs.get(graph, "bias", self.bias[lo:hi]) if self.bias is not None else None
        args = (x, weight, bias, self.stride, self.padding, self.dilation, hi - lo)
        return graph.call_function(F.conv2d, args)


class StagedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over stage k's channel slice with the matching slice of its parameters and running
    statistics (every channel belongs to exactly one stage, so nothing is shared or left unused)."""

    def __init__(self, norm: nn.BatchNorm2d, cursor: StageCursor, bounds: Sequence[Bounds]) -> None:
        super().__init__(
            norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats
        )
        self.load_state_dict(norm.state_dict())
        self.cursor, self.bounds = cursor, list(bounds)

    def forward(self, x: Tensor) -> Tensor:
        lo, hi = self.bounds[self.cursor.current().stage]
        use_batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean[lo:hi] if track and self.running_mean is not None else None
        running_var = self.running_var[lo:hi] if track and self.running_var is not None else None
        weight = self.weight[lo:hi] if self.weight is not None else None
        bias = self.bias[lo:hi] if self.bias is not None else None
        # The running statistics are views of the buffers: batch_norm updates their slice in place.
        return F.batch_norm(
            x, running_mean, running_var, weight, bias, use_batch_stats, self.momentum, self.eps
        )


@register_conv_bn_fuser(StagedConv2d, norms=(StagedBatchNorm2d,))
def fold_into_staged_conv(conv: nn.Module, norm: nn.Module) -> nn.Module:
    """Fold, in place, stage k's slice of `norm` into stage k's weight block of `conv` (torch's
    `fuse_conv_bn_weights` per block); every block then has a bias."""
    assert isinstance(conv, StagedConv2d) and isinstance(norm, StagedBatchNorm2d)
    _check_bounds(conv.out_bounds, norm.bounds)
    weights, biases = [], []
    for k, (lo, hi) in enumerate(conv.out_bounds):
        bias = conv.biases[k] if conv.biases is not None else None
        weight, bias = fuse_conv_bn_weights(conv.weights[k], bias, *_norm_slice(norm, lo, hi))
        weights.append(weight)
        biases.append(bias)
    conv.weights, conv.biases = nn.ParameterList(weights), nn.ParameterList(biases)
    return conv


@register_conv_bn_fuser(StagedDepthwiseConv2d, norms=(StagedBatchNorm2d,))
def fold_into_staged_depthwise(conv: nn.Module, norm: nn.Module) -> nn.Module:
    """Fold, in place, `norm` into a depthwise conv: channel c's filter takes channel c's affine
    map, so the whole weight folds at once and each stage keeps slicing its channels."""
    assert isinstance(conv, StagedDepthwiseConv2d) and isinstance(norm, StagedBatchNorm2d)
    _check_bounds(conv.bounds, norm.bounds)
    conv.weight, conv.bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, *_norm_slice(norm, 0, norm.num_features)
    )
    return conv


@register_branch_merger(StagedDepthwiseConv2d)
def merge_staged_depthwise(block: MultiBranch) -> nn.Module:
    """A depthwise ACNet/RepVGG block of a staged network as one staged depthwise conv: channel c
    only reads channel c, so the whole kernel merges as in a plain block and each stage keeps
    slicing its channels."""
    kernel, bias = merged_kernel(block)
    merged = _copy_staged(block.branches()[0].conv)
    merged.weight, merged.bias = nn.Parameter(kernel), nn.Parameter(bias)
    return merged


@register_branch_merger(StagedConv2d)
def merge_staged_dense(block: MultiBranch) -> nn.Module:
    """A dense ACNet/RepVGG block of a staged network as one staged conv: stage k's weight blocks
    of the branches read the same input slice (one plan per block, `plan_stages`), so they add up
    block by block; the identity branch picks, for output channel c, channel c of the stage's own
    input slice, which comes last in its input."""
    branches = block.branches()
    first = branches[0].conv
    assert isinstance(first, StagedConv2d)
    if any(b.conv.reads != first.reads for b in branches):
        raise ValueError("the branches of one block were given different stage plans")
    centre = block.kernel_size // 2
    weights, biases = [], []
    for k, (lo, hi) in enumerate(first.out_bounds):
        parts = [(*_stage_kernel(b.conv, b.norm, k, lo, hi), b.offset) for b in branches]
        in_columns = first.weights[k].shape[1]
        if block.identity is not None:
            assert isinstance(block.identity, StagedBatchNorm2d)
            # the stage's own slice comes last in its input (after the earlier stages it reads)
            own = in_columns - (hi - lo)
            columns = torch.arange(hi - lo, device=first.weights[k].device) + own
            eye = identity_kernel(columns, in_columns, first.weights[k])
            folded = fuse_conv_bn_weights(eye, None, *_norm_slice(block.identity, lo, hi))
            parts.append((folded[0].detach(), folded[1].detach(), (centre, centre)))
        kernel, bias = place_kernels((hi - lo, in_columns, *(block.kernel_size,) * 2), parts)
        weights.append(nn.Parameter(kernel))
        biases.append(nn.Parameter(bias))
    merged = _copy_staged(first)
    merged.weights, merged.biases = nn.ParameterList(weights), nn.ParameterList(biases)
    return merged


def _stage_kernel(
    conv: nn.Module, norm: nn.Module, k: int, lo: int, hi: int
) -> tuple[Tensor, Tensor]:
    """(kernel, bias) of stage k's block of a staged branch conv and its norm (folded already:
    nn.Identity, or a StagedBatchNorm2d whose slice [lo, hi) is folded here)."""
    assert isinstance(conv, StagedConv2d)
    weight = conv.weights[k].detach()
    bias = conv.biases[k].detach() if conv.biases is not None else weight.new_zeros(hi - lo)
    if isinstance(norm, nn.Identity):
        return weight.clone(), bias.clone()
    assert isinstance(norm, StagedBatchNorm2d)
    folded = fuse_conv_bn_weights(weight, bias, *_norm_slice(norm, lo, hi))
    return folded[0].detach(), folded[1].detach()


def _copy_staged(conv: nn.Module) -> nn.Module:
    """A deep copy of a staged conv that still shares the network's one cursor."""
    cursor = conv.cursor
    return copy.deepcopy(conv, memo={id(cursor): cursor})


def _norm_slice(
    norm: StagedBatchNorm2d, lo: int, hi: int
) -> tuple[Tensor, Tensor, float, Tensor | None, Tensor | None]:
    """Running mean, running variance, eps, weight and bias of channels [lo, hi) of `norm`."""
    assert norm.running_mean is not None and norm.running_var is not None
    weight = norm.weight[lo:hi] if norm.weight is not None else None
    bias = norm.bias[lo:hi] if norm.bias is not None else None
    return norm.running_mean[lo:hi], norm.running_var[lo:hi], norm.eps, weight, bias


def _check_bounds(conv_bounds: Sequence[Bounds], norm_bounds: Sequence[Bounds]) -> None:
    if list(conv_bounds) != list(norm_bounds):
        raise ValueError(f"stage slices differ: conv {conv_bounds}, norm {norm_bounds}")
