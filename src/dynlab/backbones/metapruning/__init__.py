"""MetaPruning's PruningNets (Liu et al., ICCV 2019; official code liuzechun/MetaPruning), one per
channel space: MobileNetV2 and ResNet-50 as the official code lays them out, and CIFAR-sized
ResNet-8/20/56 and MobileNetV2 that run on a CPU. `PruningNet.child(genes)` / `standalone(genes)`
are the pruned networks (`PrunedNet`). A space's grid can be given (`scales=[...]`); one that
leaves a pruned width at zero channels is refused."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs

from dynlab.backbones._base import cifar_cfg, imagenet_cfg
from dynlab.backbones.metapruning.nets import PrunedNet, PruningNet
from dynlab.backbones.metapruning.space import SCALES, Space, mobilenetv2_space, resnet_space
from dynlab.backbones.registry import register_backbone
from dynlab.capabilities import Capability

__all__ = ["SCALES", "PrunedNet", "PruningNet", "Space"]

default_cfgs = generate_default_cfgs(
    {
        "cifar_pruningnet_resnet8": cifar_cfg((8, 8), "stem.conv"),
        "cifar_pruningnet_resnet20": cifar_cfg((8, 8), "stem.conv"),
        "cifar_pruningnet_resnet56": cifar_cfg((8, 8), "stem.conv"),
        "cifar_pruningnet_mobilenetv2": cifar_cfg((4, 4), "stem.conv"),
        "pruningnet_mobilenetv2": imagenet_cfg("stem.conv", "head.fc", "bilinear"),
        "pruningnet_resnet50": imagenet_cfg("stem.conv", "head.fc", "bilinear"),
    }
)


def _build(name: str, space: Callable[..., Space], kwargs: dict[str, Any]) -> PruningNet:
    """The PruningNet of `space(in_chans=..., scales=...)` through timm's builder."""
    scales: Sequence[float] = kwargs.pop("scales", None) or SCALES
    built = space(scales=tuple(float(s) for s in scales))
    return build_model_with_cfg(
        PruningNet, name, kwargs.pop("pretrained", False), space=built, **kwargs
    )


def _cifar_resnet(repeats: int) -> Callable[..., Space]:
    """He et al.'s CIFAR ResNet-(6n+2): 16/32/64 basic blocks, with projection shortcuts at every
    stage's start as the official ResNet-50 PruningNet (He et al.'s CIFAR nets pad instead)."""

    def space(**kw: Any) -> Space:
        return resnet_space((16, 32, 64), (repeats,) * 3, (1, 2, 2), False, 16, False, **kw)

    return space


@register_backbone(Capability.pruning_net)
def cifar_pruningnet_resnet8(pretrained: bool = False, **kwargs: Any) -> PruningNet:
    """The PruningNet of CIFAR ResNet-8 (one block a stage): the CPU-sized space for tests."""
    return _build(
        "cifar_pruningnet_resnet8", _cifar_resnet(1), {**kwargs, "pretrained": pretrained}
    )


@register_backbone(Capability.pruning_net)
def cifar_pruningnet_resnet20(pretrained: bool = False, **kwargs: Any) -> PruningNet:
    """The PruningNet of CIFAR ResNet-20."""
    return _build(
        "cifar_pruningnet_resnet20", _cifar_resnet(3), {**kwargs, "pretrained": pretrained}
    )


@register_backbone(Capability.pruning_net)
def cifar_pruningnet_resnet56(pretrained: bool = False, **kwargs: Any) -> PruningNet:
    """The PruningNet of CIFAR ResNet-56."""
    return _build(
        "cifar_pruningnet_resnet56", _cifar_resnet(9), {**kwargs, "pretrained": pretrained}
    )


def _cifar_mobilenetv2(**kw: Any) -> Space:
    """MobileNetV2 at 1.0x for 32x32 inputs: the stem and the second stage at stride 1 (as the
    common CIFAR MobileNetV2), the last conv 1280 wide."""
    return mobilenetv2_space(
        32,
        (16, 24, 32, 64, 96, 160, 320),
        (1, 2, 3, 4, 3, 3, 1),
        (1, 1, 2, 2, 1, 2, 1),
        (1, 6, 6, 6, 6, 6, 6),
        1,
        1280,
        **kw,
    )


@register_backbone(Capability.pruning_net)
def cifar_pruningnet_mobilenetv2(pretrained: bool = False, **kwargs: Any) -> PruningNet:
    """The PruningNet of a CIFAR MobileNetV2 (1.0x widths)."""
    return _build(
        "cifar_pruningnet_mobilenetv2", _cifar_mobilenetv2, {**kwargs, "pretrained": pretrained}
    )


def _official_mobilenetv2(**kw: Any) -> Space:
    """The official space (mobilenetv2/training/mobilenet_v2.py l.19, l.189): MobileNetV2 1.4x
    widths truncated (44, 22, 33, 44, 88, 132, 224, 448), stride 2 into every new width but 132
    and 448, the last conv 1280 wide."""
    return mobilenetv2_space(
        44,
        (22, 33, 44, 88, 132, 224, 448),
        (1, 2, 3, 4, 3, 3, 1),
        (1, 2, 2, 2, 1, 2, 1),
        (1, 6, 6, 6, 6, 6, 6),
        2,
        1280,
        **kw,
    )


@register_backbone(Capability.pruning_net)
def pruningnet_mobilenetv2(pretrained: bool = False, **kwargs: Any) -> PruningNet:
    """The official MobileNetV2 PruningNet for ImageNet (224x224)."""
    return _build(
        "pruningnet_mobilenetv2", _official_mobilenetv2, {**kwargs, "pretrained": pretrained}
    )


def _official_resnet50(**kw: Any) -> Space:
    """The official ResNet-50 space (resnet/training/resnet.py): bottlenecks 3/4/6/3, the stem
    7x7/2 with max pooling, stage 4's 2048 outputs never pruned."""
    return resnet_space((256, 512, 1024, 2048), (3, 4, 6, 3), (1, 2, 2, 2), True, 64, True, **kw)


@register_backbone(Capability.pruning_net)
def pruningnet_resnet50(pretrained: bool = False, **kwargs: Any) -> PruningNet:
    """The official ResNet-50 PruningNet for ImageNet (224x224)."""
    return _build("pruningnet_resnet50", _official_resnet50, {**kwargs, "pretrained": pretrained})
