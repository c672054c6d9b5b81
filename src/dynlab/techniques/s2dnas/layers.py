"""Stage-aware Conv2d and BatchNorm2d: the layers that make one backbone compute stage by stage.

The S2D network runs the backbone's own `forward_features` once per stage. While stage k runs,
every feature map holds only stage k's channel slice; the staged layers read which stage is running
from a `StageCursor` shared by all of them, and keep the inputs later stages reuse in its `StageRun`
(earlier stages are never recomputed). Everything else in the backbone (activations, pooling,
residual additions) is channel-local and works on the slices unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Bounds = tuple[int, int]


class StageRun:
    """One batch going through the stages: its image, the next stage, and what later stages reuse."""

    def __init__(self, image: Tensor) -> None:
        self.image = image
        self.stage = 0
        self.conv_inputs: dict[int, list[Tensor]] = {}  # conv index -> its input at stages 0..k-1
        self.pooled: list[Tensor] = []  # pooled last feature map of every finished stage

    def keep(self, mask: Tensor) -> None:
        """Drop the samples where `mask` is False from the image and from every kept tensor."""
        self.image = self.image[mask]
        self.conv_inputs = {i: [t[mask] for t in ts] for i, ts in self.conv_inputs.items()}
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


class StagedConv2d(nn.Module):
    """A dense conv cut into per-stage weight blocks: stage k computes its output slice from its own
    input slice, or from the inputs of stages 1..k when it concatenates (only live blocks are kept)."""

    def __init__(
        self,
        conv: nn.Conv2d,
        index: int,
        cursor: StageCursor,
        out_bounds: Sequence[Bounds],
        in_bounds: Sequence[Bounds] | None,
        reads_earlier: Sequence[bool],
    ) -> None:
        """`in_bounds` None: the conv reads the network input, whole, at every stage."""
        super().__init__()
        self.index, self.cursor = index, cursor
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.reads_earlier = list(reads_earlier)
        self.reads_image = in_bounds is None
        # Stage k's input must be kept if a later stage concatenates it.
        self.keep_for_later = [any(self.reads_earlier[k + 1 :]) for k in range(len(out_bounds))]
        weight = conv.weight.detach()
        blocks, biases = [], []
        for k, (lo, hi) in enumerate(out_bounds):
            if in_bounds is None:
                start, stop = 0, conv.in_channels
            else:
                start, stop = (0 if self.reads_earlier[k] else in_bounds[k][0]), in_bounds[k][1]
            blocks.append(nn.Parameter(weight[lo:hi, start:stop].clone()))
            if conv.bias is not None:
                biases.append(nn.Parameter(conv.bias.detach()[lo:hi].clone()))
        self.weights = nn.ParameterList(blocks)
        self.biases = nn.ParameterList(biases) if biases else None

    def forward(self, x: Tensor) -> Tensor:
        run = self.cursor.current()
        k = run.stage
        inputs = x
        if not self.reads_image:
            kept = run.conv_inputs.setdefault(self.index, [])
            if self.reads_earlier[k]:
                inputs = torch.cat([*kept, x], dim=1)
            if self.keep_for_later[k]:
                kept.append(x)
        bias = self.biases[k] if self.biases is not None else None
        return F.conv2d(inputs, self.weights[k], bias, self.stride, self.padding, self.dilation)


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
