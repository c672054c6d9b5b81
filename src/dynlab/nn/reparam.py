"""Structural re-parameterisation: ACNet's and RepVGG's multi-branch blocks and their deploy form.

Each block trains several conv + BatchNorm branches over aligned windows and returns their sum. In
eval mode a BatchNorm is a per-channel affine map, so every branch is a conv with a bias, and
convs over aligned windows add up to ONE conv: `reparameterize()` returns that plain nn.Conv2d
(with bias), whose outputs equal the block's eval-mode outputs.

- `ACBlock` (Ding et al., "ACNet", ICCV 2019; official `acnet/acb.py`): k x k, 1 x k and k x 1.
- `RepVGGBlock` (Ding et al., "RepVGG", CVPR 2021; official `repvgg.py`): 3 x 3, 1 x 1 and an
  identity BN. The block returns the sum WITHOUT the ReLU the official block applies after it:
  the activation is the caller's own module, so the deploy form is exactly one conv.

Both blocks describe themselves the same way (`branches()`: each conv + norm and where its kernel
sits in the k x k window; `identity`: the norm of an identity branch, or None), and merging is
looked up by the branches' conv type (`register_branch_merger`): plain nn.Conv2d here, S2DNAS
registers its per-stage convs, so a block inside a staged network merges stage by stage too.
`reparameterize()` reads the running statistics whatever the block's mode, leaves the block as it
is, and returns a new conv on the block's device and dtype. It accepts a block whose branch norms
`dynlab.nn.fuse.fold_batchnorm` has already folded (`DynamicNet.deploy` does that first: the
branch conv then carries a bias and its norm is nn.Identity), so folding and re-parameterising
can come in either order. The folding itself is torch's `fuse_conv_bn_weights`, the function
behind `fuse_conv_bn_eval` that `dynlab.nn.fuse` folds with; `fuse.fold_bn_into_kernel` exposes
it on bare kernels (an identity branch has no conv module, WeightNet's kernels are generated).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from dynlab.nn.fuse import fold_batchnorm, fold_bn_into_kernel

__all__ = [
    "ACBlock",
    "Branch",
    "RepVGGBlock",
    "branch_kernel",
    "fold_and_merge",
    "identity_kernel",
    "merged_kernel",
    "place_kernels",
    "register_branch_merger",
    "reparameterize_modules",
]


@dataclass(frozen=True)
class Branch:
    """One conv + norm branch of a multi-branch block; its kernel sits at `offset` (row, column)
    of the block's k x k window."""

    conv: nn.Module
    norm: nn.Module
    offset: tuple[int, int]


class MultiBranch(Protocol):
    """What a merger reads of a block (ACBlock, RepVGGBlock)."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    groups: int
    identity: nn.Module | None  # the norm of an identity branch (output i reads input i)

    def branches(self) -> list[Branch]: ...


Merger = Callable[[MultiBranch], nn.Module]
_MERGERS: dict[type[nn.Module], Merger] = {}


def register_branch_merger(*conv_types: type[nn.Module]) -> Callable[[Merger], Merger]:
    """Decorator: `merge(block)` returns the one conv equal to `block` in eval mode when all its
    branch convs are of exactly one of `conv_types`."""

    def register(merge: Merger) -> Merger:
        for conv_type in conv_types:
            _MERGERS[conv_type] = merge
        return merge

    return register


def merge_block(block: MultiBranch) -> nn.Module:
    """The block's merged conv, or the block itself when no merger knows its branch convs."""
    kinds = {type(branch.conv) for branch in block.branches()}
    merge = _MERGERS.get(kinds.pop()) if len(kinds) == 1 else None
    return merge(block) if merge is not None else block  # type: ignore[return-value]


def place_kernels(
    shape: Sequence[int], parts: Iterable[tuple[Tensor, Tensor, tuple[int, int]]]
) -> tuple[Tensor, Tensor]:
    """The sum of (kernel, bias, offset) parts: each kernel added into a zero kernel of `shape`
    at its (row, column) offset, the biases summed."""
    kernel, bias = None, None
    for part, part_bias, (row, col) in parts:
        if kernel is None:
            kernel = part.new_zeros(shape)
            bias = part_bias.new_zeros(shape[0])
        kernel[:, :, row : row + part.shape[2], col : col + part.shape[3]] += part
        bias = bias + part_bias
    assert kernel is not None and bias is not None, "a block has at least one branch"
    return kernel, bias


def identity_kernel(columns: Tensor, in_columns: int, like: Tensor) -> Tensor:
    """A 1x1 kernel (len(columns), in_columns, 1, 1) where output i reads input `columns[i]`."""
    eye = like.new_zeros(len(columns), in_columns, 1, 1)
    eye[torch.arange(len(columns), device=eye.device), columns, 0, 0] = 1.0
    return eye


def merged_kernel(block: MultiBranch) -> tuple[Tensor, Tensor]:
    """(kernel, bias) of the whole block in eval mode, for branch convs with a `weight` and `bias`
    over the whole channel range (nn.Conv2d, a depthwise conv)."""
    parts = [(*branch_kernel(b.conv, b.norm), b.offset) for b in block.branches()]
    first = parts[0][0]
    if block.identity is not None:
        # official repvgg.py `_fuse_bn_tensor`: output i reads input i, which is channel
        # i % (in / groups) of its group
        in_per_group = block.in_channels // block.groups
        columns = torch.arange(block.out_channels, device=first.device) % in_per_group
        eye = identity_kernel(columns, in_per_group, first)
        centre = block.kernel_size // 2
        parts.append((*fold_bn_into_kernel(eye, None, block.identity), (centre, centre)))
    shape = (block.out_channels, block.in_channels // block.groups, *(block.kernel_size,) * 2)
    return place_kernels(shape, parts)


@register_branch_merger(nn.Conv2d)
def _merge_plain(block: MultiBranch) -> nn.Module:
    return _plain_conv(*merged_kernel(block), block.stride, block.padding, block.groups)


def branch_kernel(conv: nn.Module, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """(kernel, bias) of one conv + norm branch; the norm may already be folded (nn.Identity)."""
    if isinstance(norm, nn.Identity):
        bias = conv.bias if conv.bias is not None else torch.zeros_like(conv.weight[:, 0, 0, 0])
        return conv.weight.detach().clone(), bias.detach().clone()
    return fold_bn_into_kernel(conv.weight, conv.bias, norm)


def _plain_conv(
    kernel: Tensor, bias: Tensor, stride: int, padding: int | tuple[int, int], groups: int
) -> nn.Conv2d:
    """An nn.Conv2d with bias holding `kernel` (out, in / groups, kh, kw) and `bias`."""
    out_channels, in_per_group, kh, kw = kernel.shape
    conv = nn.Conv2d(
        in_per_group * groups,
        out_channels,
        (kh, kw),
        stride=stride,
        padding=padding,
        groups=groups,
        bias=True,
        device=kernel.device,
        dtype=kernel.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)  # type: ignore[union-attr]
    return conv


def _check_positive(**values: int) -> None:
    """ValueError unless every value is a positive int."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class ACBlock(nn.Module):
    """ACNet's asymmetric convolution block: k x k, 1 x k and k x 1 conv + BN branches, summed.

    The 1 x k (horizontal) and k x 1 (vertical) windows are the centre row and column of the
    square window at every output position, which is what lets `reparameterize()` add their
    kernels into the square kernel. Convs have no bias (official `acnet/acb.py`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        gamma_init: float = 1.0,
    ) -> None:
        super().__init__()
        _check_positive(
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            stride=stride,
            groups=groups,
        )
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(
                f"ACBlock needs an odd kernel_size >= 3 (centre row and column), got {kernel_size}"
            )
        padding = kernel_size // 2 if padding is None else padding
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative int or None, got {padding!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups = (
            kernel_size,
            stride,
            padding,
            groups,
        )
        # Official acnet/acb.py: with p >= k//2 the thin branches pad (p - k//2) across their thin
        # side; with p < k//2 the input is cropped by (k//2 - p) on that side instead.
        offset = padding - kernel_size // 2
        self.crop = max(0, -offset)
        thin_pad = max(0, offset)

        def conv(size: tuple[int, int], pad: tuple[int, int]) -> nn.Conv2d:
            return nn.Conv2d(
                in_channels, out_channels, size, stride, pad, groups=groups, bias=False
            )

        k = kernel_size
        self.square_conv = conv((k, k), (padding, padding))
        self.square_bn = nn.BatchNorm2d(out_channels)
        self.hor_conv = conv((1, k), (thin_pad, padding))
        self.hor_bn = nn.BatchNorm2d(out_channels)
        self.ver_conv = conv((k, 1), (padding, thin_pad))
        self.ver_bn = nn.BatchNorm2d(out_channels)
        self.gamma_init = float(gamma_init)
        self.reset_gamma()

    def reset_gamma(self) -> None:
        """Every branch BN's scale to `gamma_init` (official `acb.py` `init_gamma`; its CIFAR
        recipes use 1/3, so the three branches start summing to one BN's scale)."""
        for norm in (self.square_bn, self.hor_bn, self.ver_bn):
            nn.init.constant_(norm.weight, self.gamma_init)

    def forward(self, x: Tensor) -> Tensor:
        hor_in = ver_in = x
        if self.crop:
            c = self.crop
            hor_in = x[:, :, c:-c, :]  # rows: the 1 x k window is the square's centre row
            ver_in = x[:, :, :, c:-c]  # columns: the k x 1 window is its centre column
        return (
            self.square_bn(self.square_conv(x))
            + self.hor_bn(self.hor_conv(hor_in))
            + self.ver_bn(self.ver_conv(ver_in))
        )

    identity = None  # no identity branch

    def branches(self) -> list[Branch]:
        """The square branch, then the 1 x k and k x 1 ones on its centre row and column."""
        centre = self.kernel_size // 2
        return [
            Branch(self.square_conv, self.square_bn, (0, 0)),
            Branch(self.hor_conv, self.hor_bn, (centre, 0)),
            Branch(self.ver_conv, self.ver_bn, (0, centre)),
        ]

    def reparameterize(self) -> nn.Module:
        """One k x k conv with bias equal to the block in eval mode: each BN folded into its
        branch, the 1 x k and k x 1 kernels added to the centre row and column (the block itself
        when no merger knows its branch convs)."""
        return merge_block(self)


class RepVGGBlock(nn.Module):
    """RepVGG's training-time block: 3x3 conv + BN, 1x1 conv + BN and, when in == out and
    stride 1, an identity BN; returns their SUM (apply the ReLU outside, as its own module)."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        _check_positive(
            in_channels=in_channels, out_channels=out_channels, stride=stride, groups=groups
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.groups = stride, groups
        # official repvgg.py: convs without bias, the 1x1 branch padded 0 so it reads the centre
        # of the 3x3 window, the identity branch a BN only where the shapes allow it
        self.dense_conv = nn.Conv2d(
            in_channels, out_channels, 3, stride, 1, groups=groups, bias=False
        )
        self.dense_bn = nn.BatchNorm2d(out_channels)
        self.point_conv = nn.Conv2d(
            in_channels, out_channels, 1, stride, 0, groups=groups, bias=False
        )
        self.point_bn = nn.BatchNorm2d(out_channels)
        has_identity = in_channels == out_channels and stride == 1
        self.identity_bn = nn.BatchNorm2d(in_channels) if has_identity else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.dense_bn(self.dense_conv(x)) + self.point_bn(self.point_conv(x))
        if self.identity_bn is not None:
            y = y + self.identity_bn(x)
        return y

    kernel_size, padding = 3, 1

    @property
    def identity(self) -> nn.Module | None:
        return self.identity_bn

    def branches(self) -> list[Branch]:
        """The 3 x 3 branch, then the 1 x 1 one at the window's centre."""
        return [
            Branch(self.dense_conv, self.dense_bn, (0, 0)),
            Branch(self.point_conv, self.point_bn, (1, 1)),
        ]

    def reparameterize(self) -> nn.Module:
        """One 3x3 conv with bias equal to the block in eval mode: the 1x1 kernel and the
        identity (a 1x1 kernel picking each channel, within its group) added at the centre (the
        block itself when no merger knows its branch convs)."""
        return merge_block(self)


def reparameterize_modules(root: nn.Module) -> list[str]:
    """Replace every submodule of `root` that has a `reparameterize()` (ACBlock, RepVGGBlock,
    FReLU, ...) by what it returns, outermost first (one returning None converted itself in
    place, as timm's re-parameterisable blocks do); the names converted. A deploy form calls it
    after folding BatchNorm (either order gives the same network)."""
    replaced: list[str] = []
    for name, module in list(root.named_modules()):
        if not name or any(name.startswith(done + ".") for done in replaced):
            continue
        convert = getattr(module, "reparameterize", None)
        if convert is None:
            continue
        new = convert()
        if new is None:  # converted itself in place (timm's RepVGG / MobileOne blocks)
            replaced.append(name)
        elif new is not module:
            parent, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, child, new)
            replaced.append(name)
    return replaced


def fold_and_merge(module: nn.Module, method: str = "forward") -> None:
    """What every deploy form does to its convs, in place: fold each BatchNorm that follows a conv
    in `module.<method>` (`fold_batchnorm`), then merge every re-parameterisable block."""
    fold_batchnorm(module, method=method)
    reparameterize_modules(module)
