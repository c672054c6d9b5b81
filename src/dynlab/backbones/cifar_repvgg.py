"""RepVGG (Ding et al., CVPR 2021) for 32x32 inputs, registered in timm as `cifar_repvgg_a0/b0`.

The official `repvgg.py` layout: a stem block 3 -> min(64, 64a), then four stages of 2/4/14/1
(A) or 4/6/16/1 (B) blocks at widths 64a, 128a, 256a and 512b, the first block of every stage
with stride 2, global average pooling and one linear classifier; A0 has a = 0.75, b = 2.5 and B0
a = 1, b = 2.5. Every block is a RepVGG block (3x3, 1x1 and identity branches with BN) and a ReLU.
For 32x32 inputs the stem has stride 1 (the ImageNet stem's stride 2 would leave a 1x1 map), so
the last map is 2x2. At 3x32x32 with 10 classes the deploy form of A0 has 7.04 M parameters and
111 M MACs, B0 13.07 M and 249 M (`tests/test_blocks.py` measures them).

`conv=plain` builds the same widths with plain conv + BN (the paper's "plain" baseline);
`conv=acnet|weightnet` and `act=frelu` put the talk's other blocks on the same layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import Tensor, nn

from dynlab.backbones._base import CifarClassifier, cifar_cfg
from dynlab.backbones.registry import register_backbone
from dynlab.capabilities import Capability
from dynlab.nn.blocks import activation, check_block_options, conv_norm

__all__ = ["CifarRepVGG"]

CONVS = ("repvgg", "plain", "acnet", "weightnet")
ACTS = ("relu", "frelu", "frelu_light")
# official repvgg.py create_RepVGG_A0 / create_RepVGG_B0
ARCHS = {
    "a0": ((2, 4, 14, 1), (0.75, 2.5)),
    "b0": ((4, 6, 16, 1), (1.0, 2.5)),
}


class CifarRepVGG(CifarClassifier):
    """A RepVGG body (stem block, four stages of conv + BN + act blocks) for 32x32 inputs."""

    def __init__(
        self,
        num_blocks: Sequence[int],
        multipliers: tuple[float, float],
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        conv: str = "repvgg",
        act: str = "relu",
    ) -> None:
        check_block_options("cifar_repvgg", conv, act, CONVS, ACTS)
        a, b = multipliers
        widths = (int(64 * a), int(128 * a), int(256 * a), int(512 * b))
        super().__init__(widths[-1], num_classes, drop_rate)
        stem_width = min(64, int(64 * a))
        self.stem = nn.Sequential(
            *conv_norm(conv, in_chans, stem_width, 3, reads_image=True),
            activation(act, stem_width),
        )
        stages, in_channels = [], stem_width
        for width, blocks in zip(widths, num_blocks, strict=True):
            stage = []
            for index in range(blocks):
                stride = 2 if index == 0 else 1
                stage.append(
                    nn.Sequential(
                        *conv_norm(conv, in_channels, width, 3, stride), activation(act, width)
                    )
                )
                in_channels = width
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        # the official repvgg.py keeps PyTorch's default init (no He init, no zero BN scales)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map, [B, 512b, H/16, W/16]."""
        return self.stages(self.stem(x))


default_cfgs = generate_default_cfgs(
    {f"cifar_repvgg_{arch}": cifar_cfg((2, 2), "stem.0") for arch in ARCHS}
)


def _create(arch: str, pretrained: bool, **kwargs: Any) -> CifarRepVGG:
    num_blocks, multipliers = ARCHS[arch]
    return build_model_with_cfg(
        CifarRepVGG,
        f"cifar_repvgg_{arch}",
        pretrained,
        num_blocks=num_blocks,
        multipliers=multipliers,
        **kwargs,
    )


@register_backbone(Capability.conv_act_options)
def cifar_repvgg_a0(pretrained: bool = False, **kwargs: Any) -> CifarRepVGG:
    """RepVGG-A0 widths for CIFAR: 7.04 M parameters, 111 M MACs deployed."""
    return _create("a0", pretrained, **kwargs)


@register_backbone(Capability.conv_act_options)
def cifar_repvgg_b0(pretrained: bool = False, **kwargs: Any) -> CifarRepVGG:
    """RepVGG-B0 widths for CIFAR: 13.07 M parameters, 249 M MACs deployed."""
    return _create("b0", pretrained, **kwargs)
