"""Structural re-parameterisation: ACNet's and RepVGG's multi-branch blocks and their deploy form.

Each block trains several conv + BatchNorm branches over aligned windows and returns their sum. In
eval mode a BatchNorm is a per-channel affine map, so every branch is a conv with a bias, and
convs over aligned windows add up to ONE conv: `reparameterize()` returns that plain nn.Conv2d
(with bias), whose outputs equal the block's eval-mode outputs.

- `ACBlock` (Ding et al., "ACNet", ICCV 2019; official `acnet/acb.py`): k x k, 1 x k and k x 1.
- `RepVGGBlock` (Ding et al., "RepVGG", CVPR 2021; official `repvgg.py`): 3 x 3, 1 x 1 and an
  identity BN. The block returns the sum WITHOUT the ReLU the official block applies after it:
  the activation is the caller's own module, so the deploy form is exactly one conv.

`reparameterize()` reads the running statistics whatever the block's mode, leaves the block as it
is, and returns a new conv on the block's device and dtype. It accepts a block whose branch norms
`dynlab.nn.fuse.fold_batchnorm` has already folded (`DynamicNet.deploy` does that first: the
branch conv then carries a bias and its norm is nn.Identity), so folding and re-parameterising
can come in either order. The folding itself is torch's `fuse_conv_bn_weights`, the function
behind `fuse_conv_bn_eval` that `dynlab.nn.fuse` folds with; `fuse.fold_bn_into_kernel` exposes
it on bare kernels (an identity branch has no conv module, WeightNet's kernels are generated).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dynlab.nn.fuse import fold_bn_into_kernel

__all__ = ["ACBlock", "RepVGGBlock", "reparameterize_modules"]


def _branch(conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor]:
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

    def reparameterize(self) -> nn.Conv2d:
        """One k x k conv with bias equal to the block in eval mode: each BN folded into its
        branch, the 1 x k and k x 1 kernels added to the centre row and column."""
        kernel, bias = _branch(self.square_conv, self.square_bn)
        hor_kernel, hor_bias = _branch(self.hor_conv, self.hor_bn)
        ver_kernel, ver_bias = _branch(self.ver_conv, self.ver_bn)
        centre = self.kernel_size // 2
        kernel[:, :, centre : centre + 1, :] += hor_kernel
        kernel[:, :, :, centre : centre + 1] += ver_kernel
        return _plain_conv(
            kernel, bias + hor_bias + ver_bias, self.stride, self.padding, self.groups
        )


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

    def reparameterize(self) -> nn.Conv2d:
        """One 3x3 conv with bias equal to the block in eval mode: the 1x1 kernel and the
        identity (a 1x1 kernel picking each channel, within its group) added at the centre."""
        kernel, bias = _branch(self.dense_conv, self.dense_bn)
        point_kernel, point_bias = _branch(self.point_conv, self.point_bn)
        kernel[:, :, 1:2, 1:2] += point_kernel
        bias = bias + point_bias
        if self.identity_bn is not None:
            # official repvgg.py `_fuse_bn_tensor`: output i reads input i, which is channel
            # i % (in / groups) of its group
            in_per_group = self.in_channels // self.groups
            eye = torch.zeros_like(point_kernel)
            channels = torch.arange(self.out_channels, device=eye.device)
            eye[channels, channels % in_per_group, 0, 0] = 1.0
            identity_kernel, identity_bias = fold_bn_into_kernel(eye, None, self.identity_bn)
            kernel[:, :, 1:2, 1:2] += identity_kernel
            bias = bias + identity_bias
        return _plain_conv(kernel, bias, self.stride, 1, self.groups)


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
