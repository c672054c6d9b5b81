"""Megvii's input-dependent layers (ECCV 2020): the FReLU activation and WeightNet's convolution.

- `FReLU` (Ma et al., "Funnel Activation for Visual Recognition"; official megvii-model/FunnelAct):
  y = max(x, T(x)), with T(x) a depthwise 3x3 conv (with bias) + BN, so the activation's
  condition sees a 3x3 neighbourhood. Deploy form: the BN folded into the depthwise conv.
- `FReLULight`: the official ShuffleNetV2's light funnel (FunnelAct `shufflenetv2/frelu_light.py`):
  T(x) = BN(depthwise 1x3(x)) + BN(depthwise 3x1(x)), two bias-free convs in parallel, summed
  (6 instead of 9 MACs per position). Deploy form: each BN folded into its conv.
- `WeightNetConv` (Ma et al., "WeightNet: Revisiting the Design Space of Weight Networks";
  official megvii-model/WeightNet `weightnet.py`): each sample gets its own conv kernel, generated
  from the globally pooled input by fc1 -> sigmoid -> grouped fc2, and the whole batch runs as
  ONE grouped convolution. `WeightNetDWConv` is the depthwise form (official `WeightNet_DW`).
  Both read either the pooled input itself or, as in the official ShuffleNetV2, a pooled vector
  that `WeightNetReduce` has already reduced once for the whole block. Their deploy form is
  themselves: the kernels depend on the input, so there is nothing to re-parameterise; a
  BatchNorm right after one does fold in (registered with `dynlab.nn.fuse`).
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dynlab.nn.fuse import fold_bn_into_kernel, register_conv_bn_fuser

__all__ = [
    "FReLU",
    "FReLULight",
    "WeightNetConv",
    "WeightNetDWConv",
    "WeightNetReduce",
    "reduced_channels",
]


class FReLU(nn.Module):
    """Funnel activation y = max(x, BN(depthwise 3x3 conv(x))); shape-preserving, y >= x."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.channels = channels
        # official FunnelAct: conv_frelu is a depthwise 3x3, stride 1, padding 1, default bias
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels)
        self.bn: nn.Module = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.max(x, self.bn(self.conv(x)))

    def reparameterize(self) -> FReLU:
        """The deploy form: an FReLU whose funnel is ONE depthwise conv with bias (BN folded in,
        `bn` is nn.Identity), equal in eval mode; a form already folded returns itself."""
        if isinstance(self.bn, nn.Identity):
            return self
        kernel, bias = fold_bn_into_kernel(self.conv.weight, self.conv.bias, self.bn)
        deployed = copy.deepcopy(self)
        with torch.no_grad():
            deployed.conv.weight.copy_(kernel)
            deployed.conv.bias.copy_(bias)  # type: ignore[union-attr]
        deployed.bn = nn.Identity()
        return deployed


class FReLULight(nn.Module):
    """FReLU with the light 1x3 + 3x1 funnel: y = max(x, BN(dw 1x3(x)) + BN(dw 3x1(x)))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.channels = channels
        # official FunnelAct `shufflenetv2/frelu_light.py`: two bias-free depthwise convs read x
        # in parallel, each with its own BN, and their sum is the funnel condition
        self.conv_h = nn.Conv2d(channels, channels, (1, 3), 1, (0, 1), groups=channels, bias=False)
        self.bn_h: nn.Module = nn.BatchNorm2d(channels)
        self.conv_v = nn.Conv2d(channels, channels, (3, 1), 1, (1, 0), groups=channels, bias=False)
        self.bn_v: nn.Module = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.max(x, self.bn_h(self.conv_h(x)) + self.bn_v(self.conv_v(x)))

    def reparameterize(self) -> FReLULight:
        """The deploy form: each BN folded into its depthwise conv (which gains a bias; the BNs
        become nn.Identity), keeping the light funnel's 6 MACs per position; equal in eval mode."""
        if isinstance(self.bn_h, nn.Identity) and isinstance(self.bn_v, nn.Identity):
            return self
        deployed = copy.deepcopy(self)
        for conv, norm in (("conv_h", "bn_h"), ("conv_v", "bn_v")):
            if not isinstance(getattr(self, norm), nn.Identity):
                setattr(deployed, conv, _conv_with_bn(getattr(self, conv), getattr(self, norm)))
                setattr(deployed, norm, nn.Identity())
        return deployed


def _conv_with_bn(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
    """A copy of `conv` with the eval-mode BN `norm` after it folded into its weight and bias."""
    kernel, bias = fold_bn_into_kernel(conv.weight, conv.bias, norm)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        conv.stride,  # type: ignore[arg-type]
        conv.padding,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=True,
    ).to(kernel)
    with torch.no_grad():
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)  # type: ignore[union-attr]
    return fused


def reduced_channels(in_channels: int) -> int:
    """Width of the pooled vector a WeightNet block's generators read: max(16, in // 16)
    (official `weightnet.py` / `shufflenet_v2.py`)."""
    return max(16, in_channels // 16)


class WeightNetReduce(nn.Module):
    """Global average pooling of a block's input, then a 1x1 conv (with bias) to
    `reduced_channels(in)`: computed once per block and read by every WeightNet conv in it."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels)
        self.in_channels, self.out_channels = in_channels, reduced_channels(in_channels)
        # official `shufflenet_v2.py`: ShuffleV2Block.reduce, applied to the mean over H and W
        self.conv = nn.Conv2d(in_channels, self.out_channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.mean(dim=(2, 3), keepdim=True))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class _GeneratedConv(nn.Module):
    """What WeightNet's two conv forms share: the pooled input fc1 reads, the conv bias, and the
    batch folded into the channels so that ONE grouped conv applies every sample's own kernel."""

    # The batch is the conv's groups: an exported graph has it fixed, so it runs per sample
    # (dynlab.evaluation.export).
    export_per_sample: ClassVar[bool] = True
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    pooled_channels: int | None
    fc1: nn.Conv2d
    fc2: nn.Conv2d
    bias: nn.Parameter | None

    M: int
    G: int

    def _set_shape(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        M: int,
        G: int,
        pooled_channels: int | None,
    ) -> None:
        """Check and keep what both forms share (padding k // 2 needs an odd k; every generated
        entry reads M / G gates)."""
        _check_positive(
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            stride=stride,
            M=M,
            G=G,
        )
        if pooled_channels is not None:
            _check_positive(pooled_channels=pooled_channels)
        if kernel_size % 2 == 0:
            raise ValueError(
                f"{type(self).__name__} needs an odd kernel_size (padding k // 2), got {kernel_size}"
            )
        if M % G:
            raise ValueError(
                f"M={M} must be a multiple of G={G} (each generated entry reads M / G gates)"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, kernel_size // 2
        self.M, self.G, self.pooled_channels = M, G, pooled_channels

    def _init_bias(self, bias: bool) -> None:
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_channels))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """fc1 as torch's default conv; fc2 normal, scaled so that with the gates near 1/2 the
        generated kernel has He-normal scale sqrt(2 / fan_in), fan_in = the entries of one
        output channel's kernel (the official `shufflenet_v2.py` draws every conv N(0, 1 / fan_in)
        and relies on the BN after it)."""
        self.fc1.reset_parameters()
        fan_in = self.fc2.out_channels // self.out_channels
        gates = self.M // self.G  # gates summed into each generated entry
        nn.init.normal_(self.fc2.weight, 0.0, math.sqrt(2.0 / fan_in) / (0.5 * math.sqrt(gates)))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def gates(self, x: Tensor, pooled: Tensor | None) -> Tensor:
        """sigmoid(fc1(p)) with p the block's reduced pooled vector (`pooled`, B x
        pooled_channels x 1 x 1) when built with `pooled_channels`, else the mean of `x`."""
        if self.pooled_channels is None:
            if pooled is not None:
                raise ValueError(
                    f"{type(self).__name__} built without pooled_channels pools its own input; "
                    "it takes no pooled vector"
                )
            pooled = x.mean(dim=(2, 3), keepdim=True)
        elif pooled is None:
            raise ValueError(
                f"{type(self).__name__} built with pooled_channels={self.pooled_channels} reads "
                "the block's reduced pooled vector: call it as layer(x, pooled)"
            )
        return torch.sigmoid(self.fc1(pooled))

    def _batched_conv(self, x: Tensor, weight: Tensor, groups_per_sample: int) -> Tensor:
        """conv2d of sample b with its own kernel `weight[b*out:(b+1)*out]`, as one grouped conv."""
        batch = x.shape[0]
        bias = None if self.bias is None else self.bias.repeat(batch)
        y = F.conv2d(
            x.reshape(1, batch * self.in_channels, x.shape[2], x.shape[3]),
            weight,
            bias,
            stride=self.stride,
            padding=self.padding,
            groups=batch * groups_per_sample,  # sample b's channels meet only sample b's kernel
        )
        return y.reshape(batch, self.out_channels, y.shape[2], y.shape[3])


class WeightNetConv(_GeneratedConv):
    """A k x k conv (padding k // 2) whose kernel is generated per sample by WeightNet.

    kernel(x) = fc2(sigmoid(fc1(p))) reshaped to (out, in, k, k), where p is the pooled input
    (its mean over H and W, or the block's reduced vector, see `pooled_channels`), fc1 a 1x1 conv
    p -> M * out (with bias) and fc2 a grouped 1x1 conv M * out -> out * in * k * k with G * out
    groups and no bias. Every fc2 group reads M / G gates and writes in * k * k / G entries of ONE
    output channel's kernel, so M and G set the cost (fc2 has out * in * k * k * M / G weights):
    in the paper's terms (C channels) M = G = 1 is SE-like (one gate per output channel scaling a
    static kernel), and M = m / C, G = 1 / C (one dense fc2 over m gates, not reachable with the
    integer M and G here) is CondConv with m experts. Official default M = G = 2.

    `pooled_channels=None` (dynlab's own standalone form, used by `conv=weightnet` on the CIFAR
    nets): fc1 reads the mean of the input itself. `pooled_channels=c`: as the official
    ShuffleNetV2 (`shufflenet_v2.py`), fc1 reads a c-channel vector that the block's shared
    `WeightNetReduce` computed once, passed as `layer(x, pooled)`. The batch is folded into the
    channels and convolved with groups = batch size, so there is no loop over samples (official
    `weightnet.py`; it special-cases batch 1, which needs nothing special here).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        M: int = 2,
        G: int = 2,
        bias: bool = False,
        pooled_channels: int | None = None,
    ) -> None:
        super().__init__()
        self._set_shape(in_channels, out_channels, kernel_size, stride, M, G, pooled_channels)
        if (in_channels * kernel_size**2) % G:
            raise ValueError(
                f"G={G} must divide in_channels * kernel_size**2 = {in_channels * kernel_size**2}"
            )
        kernel_numel = out_channels * in_channels * kernel_size**2
        self.fc1 = nn.Conv2d(pooled_channels or in_channels, M * out_channels, 1, bias=True)
        self.fc2 = nn.Conv2d(M * out_channels, kernel_numel, 1, groups=G * out_channels, bias=False)
        self._init_bias(bias)
        self.reset_parameters()

    def kernels(self, x: Tensor, pooled: Tensor | None = None) -> Tensor:
        """Each sample's conv kernel, shape (batch, out, in, k, k)."""
        k = self.kernel_size
        return self.fc2(self.gates(x, pooled)).reshape(
            x.shape[0], self.out_channels, self.in_channels, k, k
        )

    def forward(self, x: Tensor, pooled: Tensor | None = None) -> Tensor:
        k = self.kernel_size
        weight = self.kernels(x, pooled).reshape(-1, self.in_channels, k, k)
        return self._batched_conv(x, weight, groups_per_sample=1)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, M={self.M}, G={self.G}, bias={self.bias is not None}, "
            f"pooled_channels={self.pooled_channels}"
        )


class WeightNetDWConv(_GeneratedConv):
    """A depthwise k x k conv (padding k // 2) whose kernel is generated per sample by WeightNet.

    The official `WeightNet_DW` grouping (`weightnet.py`): fc1 maps the pooled vector to
    M / G * C gates (with bias), and fc2, a 1x1 conv with C groups and no bias, turns channel c's
    M / G gates into its k x k kernel (C * k * k * M / G weights). The batch is folded into the
    channels: one depthwise conv with batch * C groups. `pooled_channels` as in `WeightNetConv`.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        stride: int = 1,
        M: int = 2,
        G: int = 2,
        bias: bool = False,
        pooled_channels: int | None = None,
    ) -> None:
        super().__init__()
        self._set_shape(channels, channels, kernel_size, stride, M, G, pooled_channels)
        gates = M // G * channels
        self.fc1 = nn.Conv2d(pooled_channels or channels, gates, 1, bias=True)
        self.fc2 = nn.Conv2d(gates, channels * kernel_size**2, 1, groups=channels, bias=False)
        self._init_bias(bias)
        self.reset_parameters()

    def kernels(self, x: Tensor, pooled: Tensor | None = None) -> Tensor:
        """Each sample's depthwise kernel, shape (batch, channels, k, k)."""
        k = self.kernel_size
        return self.fc2(self.gates(x, pooled)).reshape(x.shape[0], self.out_channels, k, k)

    def forward(self, x: Tensor, pooled: Tensor | None = None) -> Tensor:
        k = self.kernel_size
        weight = self.kernels(x, pooled).reshape(-1, 1, k, k)
        return self._batched_conv(x, weight, groups_per_sample=self.in_channels)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"M={self.M}, G={self.G}, bias={self.bias is not None}, "
            f"pooled_channels={self.pooled_channels}"
        )


@register_conv_bn_fuser(WeightNetConv, WeightNetDWConv)
def _fuse_weightnet_bn(conv: nn.Module, norm: _BatchNorm) -> nn.Module:
    """A WeightNet conv with the BN after it folded in: the BN's per-channel scale multiplies the
    fc2 rows generating that output channel's kernel (fc2's outputs are ordered channel-major in
    both forms, so the rows of channel o are one contiguous block), its shift becomes the conv's
    bias."""
    assert isinstance(conv, _GeneratedConv)
    fused = copy.deepcopy(conv)
    rows = fused.fc2.weight.reshape(fused.out_channels, -1, 1, 1)
    weight, bias = fold_bn_into_kernel(rows, fused.bias, norm)
    fused.fc2.weight = nn.Parameter(weight.reshape(fused.fc2.weight.shape))
    fused.bias = nn.Parameter(bias)
    return fused
