"""Differentiable masking for weight-sharing supernets (DMaskingNAS; Wan et al., "FBNetV2", CVPR
2020, Sec. 3): Gumbel-softmax weights over the options of a choice, channel masks, a one-pass
kernel-size mix, and the input-resolution search by subsampling and interspersed zero-padding.

Channel masking (paper eqs. 1-3): the options of a width choice share the widest layer, and
`y = b(x) * M` with `M = sum_i g_i 1_i`, where `1_i` keeps the first `c_i` channels; the layer
runs once and only the mask is extra. Its expected width is `sum_i g_i c_i` (eq. 5).

Resolution search (paper Sec. 3, Fig. E): each resolution option runs the network on a nearest
subsample of the image; its output map goes back onto the largest option's output grid with zeros
interspersed (each pixel at the grid position nearest to its receptive-field centre, so for an
integer ratio every other row/column holds a value), the placed maps are mixed with the Gumbel
weights, and pooled normalised by the mixed occupancy: a one-hot choice pools exactly the chosen
option's own map. Nothing here knows a network: any supernet can use these pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from math import floor

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ChannelMask",
    "expected_width",
    "gumbel_weights",
    "intersperse",
    "kernel_masks",
    "mix_kernel",
    "mix_placed",
    "one_hot",
    "receptive_positions",
    "spread_positions",
    "subsample_nearest",
]


# --- Gumbel-softmax weights ---------------------------------------------------------------------
def gumbel_weights(
    logits: Tensor, tau: float, hard: bool = False, generator: torch.Generator | None = None
) -> Tensor:
    """One Gumbel-softmax sample over the last dim, `softmax((logits + G) / tau)` with G standard
    Gumbel noise (paper eq. 4); `hard`: the one-hot argmax in the forward, the soft gradient in the
    backward (straight-through). `generator` draws the noise (on its own device) for
    reproducible samples."""
    if not tau > 0:
        raise ValueError(f"the Gumbel-softmax temperature must be > 0, got {tau}")
    device = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape, generator=generator, device=device, dtype=logits.dtype)
    tiny = torch.finfo(logits.dtype).tiny
    noise = -torch.log(-torch.log(u.clamp_min(tiny))).to(logits.device)
    soft = torch.softmax((logits + noise) / tau, dim=-1)
    if not hard:
        return soft
    index = soft.argmax(dim=-1, keepdim=True)
    hard_one = torch.zeros_like(soft).scatter_(-1, index, 1.0)
    return hard_one - soft.detach() + soft


def one_hot(index: int, num: int, like: Tensor) -> Tensor:
    """A constant one-hot vector of length `num` at `index`, with `like`'s dtype and device."""
    if not 0 <= index < num:
        raise ValueError(f"one-hot index {index} out of range 0..{num - 1}")
    out = torch.zeros(num, dtype=like.dtype, device=like.device)
    out[index] = 1.0
    return out


# --- channel masks ------------------------------------------------------------------------------
def expected_width(g: Tensor, widths: Sequence[int]) -> Tensor:
    """Effective width `sum_i g_i c_i` (paper eq. 5), differentiable in `g`."""
    if g.shape[-1] != len(widths):
        raise ValueError(f"{g.shape[-1]} weights for {len(widths)} width options")
    return (g * torch.tensor([float(w) for w in widths], dtype=g.dtype, device=g.device)).sum(-1)


class ChannelMask(nn.Module):
    """`M = sum_i g_i 1_i` over the width options `widths` of a layer `max(widths)` wide (paper
    eqs. 1-3): channel j is kept with the total weight of the options wider than j."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or min(widths) < 1:
            raise ValueError(f"width options must be positive ints, got {widths}")
        self.widths = tuple(widths)
        self.max_width = max(widths)
        table = torch.zeros(len(widths), self.max_width)
        for i, w in enumerate(widths):
            table[i, :w] = 1.0
        self.register_buffer("table", table, persistent=False)  # derived from `widths`

    def mask(self, g: Tensor) -> Tensor:
        """The per-channel mask, shape (max_width,)."""
        if g.shape != (len(self.widths),):
            raise ValueError(f"{tuple(g.shape)} weights for {len(self.widths)} width options")
        return g @ self.table.to(g.dtype)

    def expected(self, g: Tensor) -> Tensor:
        """The effective width `sum_i g_i c_i`."""
        return expected_width(g, self.widths)

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        """`x` (N, max_width, ...) times the mask along dim 1."""
        m = self.mask(g).to(x.dtype)
        return x * m.view(1, -1, *([1] * (x.dim() - 2)))


# --- kernel-size choice in one pass -------------------------------------------------------------
def kernel_masks(kernels: Sequence[int], max_kernel: int) -> Tensor:
    """(len(kernels), K, K) 0/1 masks keeping the centred k x k window of a K x K kernel."""
    out = torch.zeros(len(kernels), max_kernel, max_kernel)
    for i, k in enumerate(kernels):
        if k < 1 or k % 2 == 0 or k > max_kernel or (max_kernel - k) % 2:
            raise ValueError(f"kernel {k} is not an odd size centred in {max_kernel}")
        lo = (max_kernel - k) // 2
        out[i, lo : lo + k, lo : lo + k] = 1.0
    return out


def mix_kernel(weight: Tensor, g: Tensor, masks: Tensor) -> Tensor:
    """The effective conv weight `W * sum_k g_k m_k`: the k x k option uses the centre of the one
    K x K weight (padding K // 2 keeps every option's output grid), so one conv runs all."""
    return weight * (g @ masks.to(g.dtype).flatten(1)).view(masks.shape[1:]).to(weight.dtype)


# --- resolution search --------------------------------------------------------------------------
def subsample_nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    """`x` (N, C, H, W) resized to `size` by centre-aligned nearest neighbour (pixel i takes
    source floor((i + 1/2) H / h), torch's "nearest-exact"): for an integer ratio, every
    ratio-th pixel. Returned as is when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="nearest-exact")


def _round_half_up(q: Fraction) -> int:
    return floor(q + Fraction(1, 2))


def receptive_positions(n_out: int, size: int, full_size: int, stride: int) -> list[int]:
    """Where the `n_out` output pixels of a body of total stride `stride`, run on a `size`-pixel
    (one axis) subsample of the image, land on the output grid of the `full_size` option: each at
    the grid pixel nearest to its receptive-field centre. With "same" padding pixel j's centre is
    input pixel j * stride, at continuous image coordinate (j * stride + 1/2) / size (centre-aligned
    subsampling), so its full-grid index is ((j * stride + 1/2) * full_size / size - 1/2) / stride,
    rounded half up (exact rational arithmetic)."""
    if min(n_out, size, full_size, stride) < 1:
        raise ValueError("receptive_positions needs positive sizes and stride")
    scale = Fraction(full_size, size)
    return [
        _round_half_up(((j * stride + Fraction(1, 2)) * scale - Fraction(1, 2)) / stride)
        for j in range(n_out)
    ]


def spread_positions(n: int, full: int) -> list[int]:
    """`n` positions spread over `full`: round(j * full / n), half up (0, 2, 4, ... for a 2x
    ratio)."""
    if not 1 <= n <= full:
        raise ValueError(f"cannot spread {n} positions over {full}")
    return [_round_half_up(Fraction(j * full, n)) for j in range(n)]


def _checked_positions(positions: Sequence[int], n: int, full: int, axis: str) -> list[int]:
    pos = [int(p) for p in positions]
    if len(pos) != n:
        raise ValueError(f"{len(pos)} {axis} positions for a map {n} {axis} tall/wide")
    if any(b <= a for a, b in zip(pos, pos[1:], strict=False)) or (pos and pos[0] < 0):
        raise ValueError(f"{axis} positions {pos} must be strictly increasing from >= 0")
    if pos and pos[-1] >= full:
        raise ValueError(f"{axis} positions {pos} do not fit a grid of {full}")
    return pos


def intersperse(
    y: Tensor,
    full_size: tuple[int, int],
    rows: Sequence[int] | None = None,
    cols: Sequence[int] | None = None,
) -> Tensor:
    """`y` (..., h, w) placed on a zero (..., H, W) grid at rows x cols (zero elsewhere): the
    paper's zero-padding with zeros interspersed. Positions default to `spread_positions`."""
    h, w = y.shape[-2:]
    big_h, big_w = full_size
    rows = _checked_positions(
        rows if rows is not None else spread_positions(h, big_h), h, big_h, "row"
    )
    cols = _checked_positions(
        cols if cols is not None else spread_positions(w, big_w), w, big_w, "column"
    )
    if (h, w) == (big_h, big_w):  # strictly increasing positions filling the grid: identity
        return y
    out = y.new_zeros(*y.shape[:-2], big_h, big_w)
    r = torch.tensor(rows, device=y.device).view(-1, 1)
    c = torch.tensor(cols, device=y.device).view(1, -1)
    out[..., r, c] = y
    return out


def mix_placed(
    maps: Sequence[Tensor],
    weights: Sequence[Tensor],
    full_size: tuple[int, int],
    positions: Sequence[tuple[Sequence[int], Sequence[int]]],
) -> Tensor:
    """`sum_r g_r place_r(y_r)` on the `full_size` grid, scaled by `H W / sum_r g_r n_r` (n_r:
    option r's pixels), so that its plain global average is the occupancy-normalised pool
    `sum_pos / sum_r g_r n_r`; a one-hot weight gives exactly the chosen map's own average."""
    if not maps or not len(maps) == len(weights) == len(positions):
        raise ValueError("mix_placed needs one weight and one (rows, cols) per map")
    mixed: Tensor | None = None
    occupancy: Tensor | None = None
    for y, g, (rows, cols) in zip(maps, weights, positions, strict=True):
        placed = intersperse(y, full_size, rows, cols) * g.to(y.dtype)
        n = g * float(y.shape[-2] * y.shape[-1])
        mixed = placed if mixed is None else mixed + placed
        occupancy = n if occupancy is None else occupancy + n
    assert mixed is not None and occupancy is not None
    return mixed * (float(full_size[0] * full_size[1]) / occupancy).to(mixed.dtype)
