"""SFR-ShuffleNetV2 (Yang et al., CondenseNet V2, CVPR 2021, Fig. 5): ShuffleNetV2 (Ma et al. 2018)
whose non-downsampling units reactivate the identity half with a sparse feature reactivation,
registered in timm as `sfr_shufflenetv2_x1_0` (ImageNet) and `cifar_sfr_shufflenetv2` (32x32).

No official code exists (official issue #6, author's answer): in a stride-1 unit the input is split
into x1 (identity) and x2; the branch turns x2 into p; an SFR from p back to x1's channels is
*added* to x1 before the usual concat and channel shuffle: out = shuffle(cat([x1 + SFR(p), p])).
Downsampling units are plain ShuffleNetV2. Widths are ShuffleNetV2 1.0x (116-232-464, 1024 last
conv); the half widths (58...) are only divisible by 2, so the SFR uses G = S = 2 by default.
The CIFAR variant uses a stride-1 stem without max pool (32 -> 4 down-sampling).
Each SFR is the `sfr` attribute of its unit, so a technique can replace it by name.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import Tensor, nn

from dynlab.backbones._base import CifarClassifier, cifar_cfg, imagenet_cfg, init_weights
from dynlab.backbones.registry import register_backbone
from dynlab.capabilities import Capability
from dynlab.nn.condense import SparseFeatureReactivation

__all__ = ["SFRShuffleNetV2", "ShuffleUnit"]

STAGE_REPEATS = (4, 8, 4)  # Ma et al. 2018, Table 5
WIDTHS_X1_0 = (24, 116, 232, 464, 1024)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's channel shuffle: [g, c/g] -> [c/g, g] over the channel axis."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _conv_bn(
    in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    return [
        nn.Conv2d(
            in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
    ]


class ShuffleUnit(nn.Module):
    """A ShuffleNetV2 unit; at stride 1 with `sfr_groups`, x1 += SFR(branch output) (Fig. 5)."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, sfr_groups: int | None
    ) -> None:
        super().__init__()
        self.stride = stride
        branch = out_channels // 2
        branch_in = in_channels if stride > 1 else in_channels // 2
        self.branch2 = nn.Sequential(
            *_conv_bn(branch_in, branch, 1),
            nn.ReLU(inplace=True),
            *_conv_bn(branch, branch, 3, stride, groups=branch),
            *_conv_bn(branch, branch, 1),
            nn.ReLU(inplace=True),
        )
        self.branch1: nn.Module | None = None
        self.sfr: SparseFeatureReactivation | None = None
        if stride > 1:
            self.branch1 = nn.Sequential(
                *_conv_bn(in_channels, in_channels, 3, stride, groups=in_channels),
                *_conv_bn(in_channels, branch, 1),
                nn.ReLU(inplace=True),
            )
        elif sfr_groups:
            self.sfr = SparseFeatureReactivation(branch, in_channels // 2, sfr_groups)

    def forward(self, x: Tensor) -> Tensor:
        if self.branch1 is not None:
            out = torch.cat([self.branch1(x), self.branch2(x)], dim=1)
        else:
            x1, x2 = x.chunk(2, dim=1)
            new = self.branch2(x2)
            if self.sfr is not None:
                x1 = self.sfr.reactivate(x1, new)
            out = torch.cat([x1, new], dim=1)
        return channel_shuffle(out, 2)


class SFRShuffleNetV2(CifarClassifier):
    """ShuffleNetV2 1.0x with SFR in every stride-1 unit, with timm's classifier API."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        cifar_stem: bool = False,
        sfr_groups: int | None = 2,
        widths: tuple[int, ...] = WIDTHS_X1_0,
    ) -> None:
        super().__init__(widths[-1], num_classes, drop_rate)
        stem: list[nn.Module] = [
            *_conv_bn(in_chans, widths[0], 3, 1 if cifar_stem else 2),
            nn.ReLU(inplace=True),
        ]
        if not cifar_stem:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        stages = []
        in_channels = widths[0]
        for repeats, width in zip(STAGE_REPEATS, widths[1:-1], strict=True):
            units = [ShuffleUnit(in_channels, width, 2, sfr_groups)]
            units += [ShuffleUnit(width, width, 1, sfr_groups) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*units))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.conv_last = nn.Sequential(*_conv_bn(in_channels, widths[-1], 1), nn.ReLU(inplace=True))
        self.apply(init_weights)

    def forward_features(self, x: Tensor) -> Tensor:
        """The map after the last 1x1 conv, [B, 1024, H/32, W/32] (H/8 for the CIFAR stem)."""
        return self.conv_last(self.stages(self.stem(x)))


default_cfgs = generate_default_cfgs(
    {
        "sfr_shufflenetv2_x1_0": imagenet_cfg("stem.0", "head.fc", "bilinear"),
        "cifar_sfr_shufflenetv2": cifar_cfg((4, 4), "stem.0"),
    }
)


@register_backbone(Capability.sparse_layers)
def sfr_shufflenetv2_x1_0(pretrained: bool = False, **kwargs: Any) -> SFRShuffleNetV2:
    """SFR-ShuffleNetV2 1.0x for ImageNet (224x224)."""
    return build_model_with_cfg(SFRShuffleNetV2, "sfr_shufflenetv2_x1_0", pretrained, **kwargs)


@register_backbone(Capability.sparse_layers)
def cifar_sfr_shufflenetv2(pretrained: bool = False, **kwargs: Any) -> SFRShuffleNetV2:
    """SFR-ShuffleNetV2 1.0x with a stride-1 stem and no max pool, for 32x32 inputs."""
    return build_model_with_cfg(
        SFRShuffleNetV2, "cifar_sfr_shufflenetv2", pretrained, cifar_stem=True, **kwargs
    )
