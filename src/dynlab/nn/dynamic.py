"""Megvii's input-dependent layers (ECCV 2020): the FReLU activation and WeightNet's convolution.

- `FReLU` (Ma et al., "Funnel Activation for Visual Recognition"; official megvii-model/FunnelAct):
  y = max(x, T(x)), with T(x) a depthwise 3x3 conv (with bias) + BN, so the activation's
  condition sees a 3x3 neighbourhood. Deploy form: the BN folded into the depthwise conv.
- `WeightNetConv` (Ma et al., "WeightNet: Revisiting the Design Space of Weight Networks";
  official megvii-model/WeightNet `weightnet.py`): each sample gets its own conv kernel, generated
  from the globally pooled input by fc1 -> sigmoid -> grouped fc2, and the whole batch runs as
  ONE grouped convolution. Its deploy form is itself: the kernels depend on the input, so there is
  nothing to re-parameterise; a BatchNorm right after it does fold in (registered with
  `dynlab.nn.fuse`).
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

__all__ = ["FReLU", "WeightNetConv"]


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


class WeightNetConv(nn.Module):
    """A k x k conv (padding k // 2) whose kernel is generated per sample by WeightNet.

    kernel(x) = fc2(sigmoid(fc1(GAP(x)))) reshaped to (out, in, k, k), where fc1 is a 1x1 conv
    in -> M * out (with bias) and fc2 a grouped 1x1 conv M * out -> out * in * k * k with G * out
    groups and no bias. Every fc2 group reads M / G gates and writes in * k * k / G entries of ONE
    output channel's kernel, so M and G set the cost (fc2 has out * in * k * k * M / G weights):
    in the paper's terms (C channels) M = G = 1 is SE-like (one gate per output channel scaling a
    static kernel), and M = m / C, G = 1 / C (one dense fc2 over m gates, not reachable with the
    integer M and G here) is CondConv with m experts. Official default M = G = 2.

    Unlike the official layer, fc1 reads the pooled input itself; the official ShuffleNetV2 block
    first reduces it with a shared 1x1 conv to max(16, in // 16) channels (`shufflenet_v2.py`).
    The batch is folded into the channels and convolved with groups = batch size, so there is no
    loop over samples (official `weightnet.py`; it special-cases batch 1, which needs nothing
    special here).
    """

    # The batch is the conv's groups: an exported graph has it fixed, so it runs per sample
    # (dynlab.evaluation.export).
    export_per_sample: ClassVar[bool] = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        M: int = 2,
        G: int = 2,
        bias: bool = False,
    ) -> None:
        super().__init__()
        values = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "kernel_size": kernel_size,
            "stride": stride,
            "M": M,
            "G": G,
        }
        for name, value in values.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if kernel_size % 2 == 0:
            raise ValueError(
                f"WeightNetConv needs an odd kernel_size (padding k // 2), got {kernel_size}"
            )
        if M % G:
            raise ValueError(
                f"M={M} must be a multiple of G={G} (each fc2 group reads M / G gates)"
            )
        if (in_channels * kernel_size**2) % G:
            raise ValueError(
                f"G={G} must divide in_channels * kernel_size**2 = {in_channels * kernel_size**2}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, kernel_size // 2
        self.M, self.G = M, G
        kernel_numel = out_channels * in_channels * kernel_size**2
        self.fc1 = nn.Conv2d(in_channels, M * out_channels, 1, bias=True)
        self.fc2 = nn.Conv2d(M * out_channels, kernel_numel, 1, groups=G * out_channels, bias=False)
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fc1 as torch's default conv; fc2 normal, scaled so that with the gates near 1/2 the
        generated kernel has He-normal scale sqrt(2 / (in * k * k)) (the official
        `shufflenet_v2.py` draws every conv N(0, 1 / fan_in) and relies on the BN after it)."""
        self.fc1.reset_parameters()
        fan_in = self.in_channels * self.kernel_size**2
        gates = self.M // self.G  # gates summed into each generated entry
        nn.init.normal_(self.fc2.weight, 0.0, math.sqrt(2.0 / fan_in) / (0.5 * math.sqrt(gates)))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def kernels(self, x: Tensor) -> Tensor:
        """Each sample's conv kernel, shape (batch, out, in, k, k)."""
        gates = torch.sigmoid(self.fc1(x.mean(dim=(2, 3), keepdim=True)))
        k = self.kernel_size
        return self.fc2(gates).reshape(x.shape[0], self.out_channels, self.in_channels, k, k)

    def forward(self, x: Tensor) -> Tensor:
        batch, k = x.shape[0], self.kernel_size
        weight = self.kernels(x).reshape(batch * self.out_channels, self.in_channels, k, k)
        bias = None if self.bias is None else self.bias.repeat(batch)
        y = F.conv2d(
            x.reshape(1, batch * self.in_channels, x.shape[2], x.shape[3]),
            weight,
            bias,
            stride=self.stride,
            padding=self.padding,
            groups=batch,  # sample b's channels meet only sample b's kernel
        )
        return y.reshape(batch, self.out_channels, y.shape[2], y.shape[3])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, M={self.M}, G={self.G}, bias={self.bias is not None}"
        )


@register_conv_bn_fuser(WeightNetConv)
def _fuse_weightnet_bn(conv: nn.Module, norm: _BatchNorm) -> nn.Module:
    """A WeightNetConv with the BN after it folded in: the BN's per-channel scale multiplies the
    fc2 rows generating that output channel's kernel (fc2's outputs are ordered channel-major, so
    the rows of channel o are one contiguous block), its shift becomes the conv's bias."""
    assert isinstance(conv, WeightNetConv)
    fused = copy.deepcopy(conv)
    rows = fused.fc2.weight.reshape(fused.out_channels, -1, 1, 1)
    weight, bias = fold_bn_into_kernel(rows, fused.bias, norm)
    fused.fc2.weight = nn.Parameter(weight.reshape(fused.fc2.weight.shape))
    fused.bias = nn.Parameter(bias)
    return fused
