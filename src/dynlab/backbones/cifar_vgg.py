"""VGG-16 with batch norm for 32x32 inputs, registered in timm as `cifar_vgg16_bn`.

The common CIFAR variant (as in kuangliu/pytorch-cifar and the network-slimming experiments): the
13 3x3 conv-BN-ReLU layers of VGG-16 (Simonyan & Zisserman 2015, config D) in five stages, each
closed by a 2x2 max-pool so 32x32 ends at 1x1, then global average pooling and a single
Linear(512, num_classes) in place of the three 4096-wide FC layers. Convs have no bias (BN follows).
At 3x32x32 with 10 classes: 14.72 M parameters, 313 M MACs.

`conv` and `act` build every conv and activation from the talk's blocks (`dynlab.nn.blocks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import Tensor, nn

from dynlab.backbones._base import CifarClassifier, cifar_cfg, init_weights
from dynlab.backbones.registry import register_backbone
from dynlab.capabilities import Capability
from dynlab.nn.blocks import activation, check_block_options, conv_norm, init_block_parameters

__all__ = ["CifarVGG"]

CONVS = ("plain", "acnet", "repvgg", "weightnet")
ACTS = ("relu", "frelu", "frelu_light")

VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class CifarVGG(CifarClassifier):
    """VGG for 32x32 inputs: conv-BN-ReLU stages each closed by a max-pool, one linear layer."""

    def __init__(
        self,
        stages: Sequence[Sequence[int]],
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        conv: str = "plain",
        act: str = "relu",
    ) -> None:
        check_block_options("cifar_vgg", conv, act, CONVS, ACTS)
        super().__init__(stages[-1][-1], num_classes, drop_rate)
        layers: list[nn.Module] = []
        in_channels = in_chans
        for widths in stages:
            for width in widths:
                layers += [
                    *conv_norm(conv, in_channels, width, 3, reads_image=not layers),
                    activation(act, width),
                ]
                in_channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.apply(init_weights)
        init_block_parameters(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map, [B, 512, H/32, W/32]."""
        return self.features(x)


default_cfgs = generate_default_cfgs({"cifar_vgg16_bn": cifar_cfg((1, 1), "features.0")})


@register_backbone(Capability.conv_act_options)
def cifar_vgg16_bn(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-16-BN for CIFAR: 14.72 M parameters, 313 M MACs."""
    return build_model_with_cfg(
        CifarVGG, "cifar_vgg16_bn", pretrained, stages=VGG16_STAGES, **kwargs
    )
