"""CIFAR ResNets (He et al. 2016, Sec. 4.2), registered in timm as
`cifar_resnet{8,14,20,32,44,56,110}` (n = 1, 2, 3, 5, 7, 9, 18).

A 3x3 stem conv with 16 channels, then three stages of n BasicBlocks with 16/32/64 channels on
32x32/16x16/8x8 maps (6n+2 weighted layers), global average pooling and one linear classifier.

Deviation from the paper: where a stage halves the map and doubles the channels, the shortcut is a
1x1 conv + BN projection (the paper's option B), not option A's zero-padded identity. S2DNAS splits
every layer's channels into stages, which needs every operation in `forward_features` to be a conv
or channel-local; zero-padding along channels is neither. The cost is two 1x1 convs: ResNet-56 has
0.856 M parameters and 126 M MACs at 3x32x32 with 10 classes (option A: 0.853 M, 125 M).

`conv` and `act` build the stem and every block's 3x3 convs and activations from the talk's blocks
(`dynlab.nn.blocks`: ACNet, RepVGG, WeightNet; FReLU); shortcut projections stay plain conv + BN.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import Tensor, nn

from dynlab.backbones._base import CifarClassifier, cifar_cfg, init_weights
from dynlab.backbones.registry import register_backbone
from dynlab.capabilities import Capability
from dynlab.nn.blocks import activation, check_block_options, conv_norm, init_block_parameters

__all__ = ["BasicBlock", "CifarResNet"]

STAGE_WIDTHS = (16, 32, 64)  # He et al. 2016, Sec. 4.2
CONVS = ("plain", "acnet", "repvgg", "weightnet")
ACTS = ("relu", "frelu", "frelu_light")


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut: identity, or a 1x1 conv-BN projection (option B)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        conv: str = "plain",
        act: str = "relu",
    ) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_norm(conv, in_channels, out_channels, 3, stride)
        self.act1 = activation(act, out_channels)
        self.conv2, self.bn2 = conv_norm(conv, out_channels, out_channels, 3)
        self.act2 = activation(act, out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class CifarResNet(CifarClassifier):
    """ResNet-(6n+2) for 32x32 inputs with timm's classifier API (`forward_features` etc.)."""

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        conv: str = "plain",
        act: str = "relu",
    ) -> None:
        check_block_options(f"cifar_resnet{depth}", conv, act, CONVS, ACTS)
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 56...), got {depth}"
            )
        super().__init__(STAGE_WIDTHS[-1], num_classes, drop_rate)
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            *conv_norm(conv, in_chans, STAGE_WIDTHS[0], 3, reads_image=True),
            activation(act, STAGE_WIDTHS[0]),
        )
        stages = []
        in_channels = STAGE_WIDTHS[0]
        for index, width in enumerate(STAGE_WIDTHS):
            strides = [1 if index == 0 else 2] + [1] * (blocks_per_stage - 1)
            stage = []
            for stride in strides:
                stage.append(BasicBlock(in_channels, width, stride, conv, act))
                in_channels = width
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.apply(init_weights)
        init_block_parameters(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map, [B, 64, H/4, W/4]."""
        return self.stages(self.stem(x))


default_cfgs = generate_default_cfgs(
    {f"cifar_resnet{depth}": cifar_cfg((8, 8), "stem.0") for depth in (8, 14, 20, 32, 44, 56, 110)}
)


def _create(variant: str, depth: int, pretrained: bool, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, depth=depth, **kwargs)


@register_backbone(Capability.conv_act_options)
def cifar_resnet8(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-8 (n=1): the shallowest of the family, a static point below ResNet-20's cost."""
    return _create("cifar_resnet8", 8, pretrained, **kwargs)


@register_backbone(Capability.conv_act_options)
def cifar_resnet14(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-14 (n=2)."""
    return _create("cifar_resnet14", 14, pretrained, **kwargs)


@register_backbone(Capability.conv_act_options)
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 (n=3): 0.27 M parameters, 41 M MACs."""
    return _create("cifar_resnet20", 20, pretrained, **kwargs)


@register_backbone(Capability.conv_act_options)
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 (n=5): 0.47 M parameters, 69 M MACs."""
    return _create("cifar_resnet32", 32, pretrained, **kwargs)


@register_backbone(Capability.conv_act_options)
def cifar_resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-44 (n=7): 0.66 M parameters, 97 M MACs."""
    return _create("cifar_resnet44", 44, pretrained, **kwargs)


@register_backbone(Capability.conv_act_options)
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 (n=9): 0.86 M parameters, 126 M MACs."""
    return _create("cifar_resnet56", 56, pretrained, **kwargs)


@register_backbone(Capability.conv_act_options)
def cifar_resnet110(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110 (n=18): 1.73 M parameters, 253 M MACs."""
    return _create("cifar_resnet110", 110, pretrained, **kwargs)
