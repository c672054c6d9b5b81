"""MobileNetV2 (Sandler et al. 2018) for 32x32 inputs, registered in timm as `cifar_mobilenetv2`.

The usual CIFAR adaptation (as in kuangliu/pytorch-cifar): the stem conv and the first stride-2
bottleneck stage (24 channels) use stride 1, so 32x32 is down-sampled 8x (to 4x4) instead of 32x.
Blocks follow the paper exactly (residual only when stride 1 and widths match, no extra shortcut
projections), width multiplier 1.0, final 1x1 conv to 1280 channels, then global average pooling
and one linear classifier. At 3x32x32 with 10 classes: 2.24 M parameters, 88 M MACs (kuangliu's
extra 1x1 shortcut projections, left out here, would add 0.06 M parameters and 2 M MACs).

`conv` builds the stem and the depthwise 3x3 convs from the talk's re-parameterisable blocks
(`dynlab.nn.blocks`: ACNet, RepVGG; WeightNet generates dense kernels, so it is refused here) and
`act` every activation (ReLU6 as in the paper, or ReLU, or FReLU); the 1x1 convs stay plain.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import Tensor, nn

from dynlab.backbones._base import CifarClassifier, cifar_cfg, init_weights
from dynlab.backbones.registry import register_backbone
from dynlab.capabilities import Capability
from dynlab.nn.blocks import activation, check_block_options, conv_norm, init_block_parameters

__all__ = ["CifarMobileNetV2", "InvertedResidual"]

STEM_WIDTH = 32
NUM_FEATURES = 1280
CONVS = ("plain", "acnet", "repvgg")
ACTS = ("relu6", "relu", "frelu", "frelu_light")
# (expansion t, width c, repeats n, first stride s): Sandler et al. 2018, Table 2, with the
# 24-channel stage's stride 2 -> 1 for 32x32 inputs.
CIFAR_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, linear 1x1 project; residual when shapes match (Sec. 3.3)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expansion: int,
        conv: str = "plain",
        act: str = "relu6",
    ) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*conv_norm("plain", in_channels, hidden, 1), activation(act, hidden)]
        depthwise = conv_norm(conv, hidden, hidden, 3, stride, groups=hidden)
        layers += [*depthwise, activation(act, hidden)]
        layers += conv_norm("plain", hidden, out_channels, 1)
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(CifarClassifier):
    """MobileNetV2 down-sampling 8x, for 32x32 inputs, with timm's classifier API."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        conv: str = "plain",
        act: str = "relu6",
    ) -> None:
        check_block_options("cifar_mobilenetv2", conv, act, CONVS, ACTS)
        super().__init__(NUM_FEATURES, num_classes, drop_rate)
        self.stem = nn.Sequential(
            *conv_norm(conv, in_chans, STEM_WIDTH, 3, reads_image=True), activation(act, STEM_WIDTH)
        )
        blocks = []
        in_channels = STEM_WIDTH
        for expansion, width, repeats, first_stride in CIFAR_SETTINGS:
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                blocks.append(InvertedResidual(in_channels, width, stride, expansion, conv, act))
                in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = nn.Sequential(
            *conv_norm("plain", in_channels, NUM_FEATURES, 1), activation(act, NUM_FEATURES)
        )
        self.apply(init_weights)
        init_block_parameters(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map, [B, 1280, H/8, W/8]."""
        return self.conv_head(self.blocks(self.stem(x)))


default_cfgs = generate_default_cfgs({"cifar_mobilenetv2": cifar_cfg((4, 4), "stem.0")})


@register_backbone(Capability.conv_act_options)
def cifar_mobilenetv2(pretrained: bool = False, **kwargs: Any) -> CifarMobileNetV2:
    """MobileNetV2 for CIFAR: 2.24 M parameters, 88 M MACs."""
    return build_model_with_cfg(CifarMobileNetV2, "cifar_mobilenetv2", pretrained, **kwargs)
