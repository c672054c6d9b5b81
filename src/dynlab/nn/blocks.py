"""The conv and activation options a backbone offers (`conv=plain|acnet|repvgg|weightnet`,
`act=relu|relu6|frelu|frelu_light`): one registry, so every backbone builds the talk's blocks the
same way.

A conv option builds what replaces one conv + BatchNorm pair of the plain network, as a (conv, norm)
pair of modules with the plain pair's shapes, so the backbone's code and its plain network's
parameter names do not change with the option (a block normalising its own branches comes with
nn.Identity as its norm). Options differ in where they apply:

- `acnet` (Ding et al., ICCV 2019): every k x k conv with k >= 3, stem included; 1 x 1 convs stay
  plain (official `acnet/acnet_builder.py` does the same), branch BN scales start at 1/3 (the
  official CIFAR recipes in `acnet/do_acnet.py`).
- `repvgg` (Ding et al., CVPR 2021): every 3 x 3 conv, stem included, with the identity branch
  where input and output shapes match; other convs stay plain.
- `weightnet` (Ma et al., ECCV 2020): dynlab's own form, NOT the official placement. Every dense
  k x k conv (k >= 3) except the stem reading the image becomes a standalone `WeightNetConv` whose
  fc1 reads its own pooled input; 1 x 1 convs stay plain, grouped and depthwise convs are refused.
  The official ShuffleNetV2 (megvii-model/WeightNet `shufflenet_v2.py`) instead puts WeightNet on
  every 1 x 1 and depthwise conv of each block, all fed by one shared reduced pooling: that is
  `dynlab.backbones.weightnet_shufflenetv2`, built directly, not through this option.
Activations: `frelu` is FReLU's 3 x 3 funnel (FunnelAct `resnet/frelu.py`), `frelu_light` its
1 x 3 + 3 x 1 funnel (FunnelAct `shufflenetv2/frelu_light.py`, used by its ShuffleNetV2).
A backbone states which options it takes; `check_block_options` refuses any other with the list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from dynlab.nn.dynamic import FReLU, FReLULight, WeightNetConv, WeightNetDWConv
from dynlab.nn.reparam import ACBlock, RepVGGBlock

__all__ = [
    "ACTS",
    "CONVS",
    "activation",
    "check_block_options",
    "conv_norm",
    "init_block_parameters",
]


ConvNorm = tuple[nn.Module, nn.Module]


# (in, out, kernel, stride, groups, reads_image) -> the (conv, norm) pair of one conv + BN
ConvBuilder = Callable[[int, int, int, int, int, bool], ConvNorm]

CONVS: dict[str, ConvBuilder] = {}
ACTS: dict[str, Callable[[int], nn.Module]] = {
    "relu": lambda channels: nn.ReLU(inplace=True),
    "relu6": lambda channels: nn.ReLU6(inplace=True),
    # both replace every activation of the net, as the official ShuffleNetV2 does (FunnelAct
    # `shufflenetv2/shufflenet_v2.py`); its ResNet-50 keeps ReLU in the stem and the last stage
    # (`resnet/resnet.py`). The 3x3 funnel is the ResNet's (`resnet/frelu.py`), the 1x3 + 3x1
    # funnel the ShuffleNetV2's (`shufflenetv2/frelu_light.py`)
    "frelu": FReLU,
    "frelu_light": FReLULight,
}


def register_conv(name: str) -> Callable[[ConvBuilder], ConvBuilder]:
    """Decorator: register `build(in, out, kernel, stride, groups, reads_image)` as conv option
    `name`."""

    def register(build: ConvBuilder) -> ConvBuilder:
        CONVS[name] = build
        return build

    return register


def _plain(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int) -> ConvNorm:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False)
    return conv, nn.BatchNorm2d(out_ch)


@register_conv("plain")
def _plain_option(
    in_ch: int, out_ch: int, kernel: int, stride: int, groups: int, reads_image: bool
) -> ConvNorm:
    return _plain(in_ch, out_ch, kernel, stride, groups)


@register_conv("acnet")
def _acnet(
    in_ch: int, out_ch: int, kernel: int, stride: int, groups: int, reads_image: bool
) -> ConvNorm:
    if kernel < 3:
        return _plain(in_ch, out_ch, kernel, stride, groups)
    return ACBlock(in_ch, out_ch, kernel, stride, groups=groups, gamma_init=1 / 3), nn.Identity()


@register_conv("repvgg")
def _repvgg(
    in_ch: int, out_ch: int, kernel: int, stride: int, groups: int, reads_image: bool
) -> ConvNorm:
    if kernel != 3:
        return _plain(in_ch, out_ch, kernel, stride, groups)
    return RepVGGBlock(in_ch, out_ch, stride, groups), nn.Identity()


@register_conv("weightnet")
def _weightnet(
    in_ch: int, out_ch: int, kernel: int, stride: int, groups: int, reads_image: bool
) -> ConvNorm:
    if reads_image or kernel == 1:
        return _plain(in_ch, out_ch, kernel, stride, groups)
    if groups != 1:
        raise ValueError(
            f"conv=weightnet generates dense kernels; this network has a {kernel}x{kernel} conv "
            f"with groups={groups}"
        )
    return WeightNetConv(in_ch, out_ch, kernel, stride), nn.BatchNorm2d(out_ch)


def conv_norm(
    option: str,
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    reads_image: bool = False,
) -> ConvNorm:
    """The (conv, norm) pair of one conv + BN of a backbone built as conv option `option`
    (padding k // 2; the norm is nn.Identity when the conv module normalises its branches)."""
    if option not in CONVS:
        raise ValueError(f"unknown conv option {option!r}; options: {', '.join(CONVS)}")
    return CONVS[option](in_ch, out_ch, kernel, stride, groups, reads_image)


def activation(option: str, channels: int) -> nn.Module:
    """The activation `option` on a `channels`-channel map."""
    if option not in ACTS:
        raise ValueError(f"unknown activation {option!r}; options: {', '.join(ACTS)}")
    return ACTS[option](channels)


def check_block_options(
    backbone: str, conv: str, act: str, convs: Sequence[str], acts: Sequence[str]
) -> None:
    """ValueError, listing what works, unless `backbone` takes conv option `conv` and activation
    `act` (a backbone takes every pairing of its `convs` and `acts`)."""
    if conv in convs and act in acts:
        return
    bad = f"conv={conv}" if conv not in convs else f"act={act}"
    raise ValueError(
        f"{backbone} cannot be built with {bad}: it takes conv={'|'.join(convs)} "
        f"with act={'|'.join(acts)} (any pairing)"
    )


def init_block_parameters(net: nn.Module) -> None:
    """Re-run the own initialisation of blocks that have one (WeightNet's generator scale, ACNet's
    branch BN scales), after a backbone's blanket conv and BN init has overwritten it."""
    for module in net.modules():
        if isinstance(module, WeightNetConv | WeightNetDWConv):
            module.reset_parameters()
        elif isinstance(module, ACBlock):
            module.reset_gamma()
