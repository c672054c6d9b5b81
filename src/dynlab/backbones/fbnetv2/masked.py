"""The supernet's searchable block: its description in the space and the masked module that runs
it once at its widest."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from dynlab.backbones.fbnetv2.layers import ConvBNAct, activation
from dynlab.nn.dmasking import ChannelMask, kernel_masks, mix_kernel


class SearchBlock(NamedTuple):
    """A searchable block: stage, max input width, hidden width options, stride, residual."""

    stage: int
    in_max: int
    mids: tuple[int, ...]
    se_mids: tuple[int, ...]
    stride: int
    residual: bool
    act: str


class DMaskBlock(nn.Module):
    """A masked inverted-residual block at its widest: pw, one dw at the largest kernel (the
    kernel choice mixes centre masks into its weight), the hidden-width mask, SE mixed on/off,
    pwl + BN and the stage's width mask before the residual add."""

    def __init__(
        self, b: SearchBlock, out_max: int, kernels: Sequence[int], se: Sequence[bool]
    ) -> None:
        super().__init__()
        mid, kmax = max(b.mids), max(kernels)
        self.pw = ConvBNAct(b.in_max, mid, act=b.act)
        self.dw = ConvBNAct(mid, mid, kmax, b.stride, groups=mid, act=b.act)
        self.register_buffer("kernel_masks", kernel_masks(kernels, kmax), persistent=False)
        self.hidden = ChannelMask(b.mids)
        self.se_options = tuple(se)
        if any(self.se_options):
            self.se_reduce = nn.Conv2d(mid, max(b.se_mids), 1)
            self.se_act = activation(b.act)
            self.se_mask = ChannelMask(b.se_mids)
            self.se_expand = nn.Conv2d(max(b.se_mids), mid, 1)
            self.se_gate = nn.Hardsigmoid()
        self.pwl = ConvBNAct(mid, out_max)
        self.residual = b.residual

    def forward(
        self, x: Tensor, g_mid: Tensor, g_kernel: Tensor, g_se: Tensor, out_mask: Tensor
    ) -> Tensor:
        h = self.pw(x)
        conv = self.dw.conv
        weight = mix_kernel(conv.weight, g_kernel, self.kernel_masks)
        h = F.conv2d(h, weight, None, conv.stride, conv.padding, groups=conv.groups)
        h = self.hidden(self.dw.act(self.dw.bn(h)), g_mid)
        if any(self.se_options):
            s = self.se_act(self.se_reduce(h.mean((2, 3), keepdim=True)))
            excited = h * self.se_gate(self.se_expand(self.se_mask(s, g_mid)))
            mixed = None
            for i, on in enumerate(self.se_options):
                term = (excited if on else h) * g_se[i].to(h.dtype)
                mixed = term if mixed is None else mixed + term
            h = mixed
        y = self.pwl(h) * out_mask.to(h.dtype).view(1, -1, 1, 1)
        return y + x if self.residual else y
