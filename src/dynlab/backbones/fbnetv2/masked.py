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
    """A searchable block: its stage, input width options (the previous block's, or the stem's),
    output width options (its stage's), hidden width options with their SE widths, stride,
    activation options and op options (("ir",) or ("ir", "skip"))."""

    stage: int
    ins: tuple[int, ...]
    outs: tuple[int, ...]
    mids: tuple[int, ...]
    se_mids: tuple[int, ...]
    stride: int
    acts: tuple[str, ...]
    ops: tuple[str, ...]

    @property
    def in_max(self) -> int:
        return max(self.ins)


class BlockWeights(NamedTuple):
    """One forward's choice weights of a block: its input width's (the previous group's), its
    output width, op, hidden width, kernel, SE and activation."""

    g_in: Tensor
    g_out: Tensor
    op: Tensor
    mid: Tensor
    kernel: Tensor
    se: Tensor
    act: Tensor


def same_width(g_a: Tensor, a: Sequence[int], g_b: Tensor, b: Sequence[int]) -> Tensor:
    """P(width a == width b) for independent choices: sum over shared widths of g_a * g_b. It
    weighs what mobile-vision builds only at equal widths (residual add, identity skip, no pw)."""
    terms = [g_a[i] * g_b[b.index(w)] for i, w in enumerate(a) if w in b]
    return sum(terms[1:], terms[0]) if terms else g_a.new_zeros(())


def _fit(x: Tensor, channels: int) -> Tensor:
    """`x` cut or zero-padded to `channels` along dim 1 (masked maps: the cut part is zero at
    one-hot choices where it is used)."""
    c = x.shape[1]
    return x[:, :channels] if c >= channels else F.pad(x, (0, 0, 0, 0, 0, channels - c))


class DMaskBlock(nn.Module):
    """A masked block at its widest: the inverted-residual op (pw, one dw at the largest kernel
    whose kernel choice mixes centre masks into its weight, the hidden mask, SE mixed on/off,
    pwl + BN, the output mask) and, when allowed, mobile-vision's skip (a 1x1 conv + BN + ReLU
    projection), mixed by the op weights. What mobile-vision builds only at equal widths is
    weighted by the probability of equal widths (`same_width`): the identity in place of the pw
    (in == hidden), the residual add and the identity skip (in == out at stride 1; irf_block.py
    IRFBlock, basic_blocks.py build_residual_connect and Identity). Activations mix by weight."""

    def __init__(self, b: SearchBlock, kernels: Sequence[int], se: Sequence[bool]) -> None:
        super().__init__()
        mid, kmax, out = max(b.mids), max(kernels), max(b.outs)
        self.spec = b
        self.acts = nn.ModuleList(activation(a) for a in b.acts)
        self.pw = ConvBNAct(b.in_max, mid)
        self.dw = ConvBNAct(mid, mid, kmax, b.stride, groups=mid)
        self.register_buffer("kernel_masks", kernel_masks(kernels, kmax), persistent=False)
        self.hidden = ChannelMask(b.mids)
        self.out_mask = ChannelMask(b.outs)
        self.se_options = tuple(se)
        if any(self.se_options):
            self.se_reduce = nn.Conv2d(mid, max(b.se_mids), 1)
            self.se_mask = ChannelMask(b.se_mids)
            self.se_expand = nn.Conv2d(max(b.se_mids), mid, 1)
            self.se_gate = nn.Hardsigmoid()
        self.pwl = ConvBNAct(mid, out)
        self.proj = ConvBNAct(b.in_max, out, act="relu") if "skip" in b.ops else None
        self.no_pw = any(w in b.mids for w in b.ins)  # the pw can be dropped
        self.can_add = b.stride == 1 and any(w in b.outs for w in b.ins)

    def _act(self, x: Tensor, g: Tensor) -> Tensor:
        if len(self.acts) == 1:
            return self.acts[0](x)
        out = None
        for act, gi in zip(self.acts, g, strict=True):
            term = act(x) * gi.to(x.dtype)
            out = term if out is None else out + term
        assert out is not None
        return out

    def _ir(self, x: Tensor, w: BlockWeights) -> Tensor:
        b = self.spec
        h = self._act(self.pw.bn(self.pw.conv(x)), w.act)
        if self.no_pw:
            keep = same_width(w.g_in, b.ins, w.mid, b.mids).to(x.dtype)
            h = h * (1 - keep) + _fit(x, h.shape[1]) * keep
        conv = self.dw.conv
        weight = mix_kernel(conv.weight, w.kernel, self.kernel_masks)
        h = F.conv2d(h, weight, None, conv.stride, conv.padding, groups=conv.groups)
        h = self.hidden(self._act(self.dw.bn(h), w.act), w.mid)
        if any(self.se_options):
            s = self._act(self.se_reduce(h.mean((2, 3), keepdim=True)), w.act)
            excited = h * self.se_gate(self.se_expand(self.se_mask(s, w.mid)))
            mixed = None
            for i, on in enumerate(self.se_options):
                term = (excited if on else h) * w.se[i].to(h.dtype)
                mixed = term if mixed is None else mixed + term
            assert mixed is not None
            h = mixed
        return self.out_mask(self.pwl(h), w.g_out)

    def forward(self, x: Tensor, w: BlockWeights) -> Tensor:
        b = self.spec
        y = self._ir(x, w)
        same = None
        if self.can_add:  # the residual (ir) or the identity (skip) when in == out
            same = same_width(w.g_in, b.ins, w.g_out, b.outs).to(x.dtype)
            y = y + _fit(x, y.shape[1]) * same
        if self.proj is None:
            return y
        skip = self.out_mask(self.proj(x), w.g_out)
        if same is not None:
            skip = skip * (1 - same) + _fit(x, y.shape[1]) * same
        return y * w.op[0].to(y.dtype) + skip * w.op[1].to(y.dtype)
