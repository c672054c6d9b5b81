"""CondenseNetV2 (Yang et al., "CondenseNet V2: Sparse Feature Reactivation for Deep Networks",
CVPR 2021), registered in timm as `condensenetv2_{a,b,c}` (ImageNet) and
`cifar_condensenetv2_{110,146,tiny}` (32x32).

A DenseNet whose layers are LGC (learned group 1x1 conv, C_in -> 4k) -> BN-act-3x3 group conv
(4k -> k) -> optional SE on the k new features; the new features then *reactivate* the old ones
through an SFR (sparse 1x1 conv k -> C_in) added to the layer input: out = cat([x + SFR(new), new])
(official `model/condensenetv2.py` `_SFR_DenseLayer`). Blocks are joined by 2x2 average pools.
Every LGC/SFR is a direct attribute (`conv_1`, `sfr`) of its dense layer, so a technique can
replace it by name with its `.condensed()` deploy form.

Official README sizes (converted, counting multiply-adds plus ReLU/pool ops): A 46M MACs / 2.0M
parameters, B 146M / 3.6M, C 309M / 6.1M at 224x224; CIFAR-110 41M / 0.48M, CIFAR-146 62M / 0.78M.
Measured here on the converted models with torch's flop counter (convs and linears only):
A 43.1M / 2.04M, B 140.5M / 3.59M, C 295.8M / 6.18M; the ~4 % MAC gap is the official counter's
ReLU/pool ops.

The CIFAR configurations are not in the official code (no CIFAR builder); they are inferred, see
`CIFAR_CONFIGS`. Deviation: the final pooling is adaptive (global) average pooling instead of a
fixed 7x7 / 8x8 kernel, which gives the same result at 224 / 32 and also works at other sizes.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import Tensor, nn

from dynlab.backbones._base import cifar_cfg, imagenet_cfg
from dynlab.backbones.registry import register_backbone
from dynlab.capabilities import Capability
from dynlab.nn.condense import ACTIVATIONS, LearnedGroupConv, SparseFeatureReactivation

__all__ = ["CondenseNetV2", "DenseLayer", "SELayer"]


class SELayer(nn.Module):
    """Squeeze-and-excitation: global average pool -> linear (C -> C/r, no bias) -> ReLU ->
    linear (C/r -> C, no bias) -> sigmoid -> channel scale (official `utils/layers.py` `SELayer`;
    its inner activation is always ReLU)."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc(x.mean(dim=(2, 3)))
        return x * scale[:, :, None, None]


class DenseLayer(nn.Module):
    """One CondenseNetV2 layer: new = [SE](conv_2(conv_1(x))); out = cat([x + sfr(new), new])."""

    def __init__(
        self,
        in_channels: int,
        growth: int,
        *,
        bottleneck: int,
        group_1x1: int,
        group_3x3: int,
        group_trans: int,
        condense_factor: int,
        sparse_factor: int,
        activation: str,
        use_se: bool,
    ) -> None:
        super().__init__()
        width = bottleneck * growth
        self.conv_1 = LearnedGroupConv(in_channels, width, group_1x1, condense_factor, activation)
        self.conv_2 = nn.Sequential(
            nn.BatchNorm2d(width),
            ACTIVATIONS[activation](),
            nn.Conv2d(width, growth, 3, padding=1, groups=group_3x3, bias=False),
        )
        self.se: nn.Module = SELayer(growth, reduction=1) if use_se else nn.Identity()
        self.sfr = SparseFeatureReactivation(
            growth, in_channels, group_trans, sparse_factor, activation
        )

    def forward(self, x: Tensor) -> Tensor:
        new = self.se(self.conv_2(self.conv_1(x)))
        return torch.cat([self.sfr.reactivate(x, new), new], dim=1)


class CondenseNetV2(nn.Module):
    """CondenseNetV2 with timm's classifier API.

    `forward_features` ends with the final BN-ReLU (before pooling); `forward_head` does global
    average pool -> SE(r = `last_se_reduction`) on the pooled 1x1 map -> flatten -> fc
    (`fc_channel`, with bias) -> hard-swish -> classifier, as the official `features`/`forward`.
    `pre_logits=True` returns the hard-swish output (`fc_channel` wide).
    """

    def __init__(
        self,
        stages: tuple[int, ...],
        growth: tuple[int, ...],
        *,
        bottleneck: int = 4,
        groups: int = 8,
        condense_factor: int | None = None,
        sparse_factor: int | None = None,
        group_3x3: int | None = None,
        group_trans: int | None = None,
        fc_channel: int = 1024,
        hs_start_block: int = 2,
        se_start_block: int = 3,
        last_se_reduction: int = 16,
        stem_stride: int = 2,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(stages) != len(growth) or not stages:
            raise ValueError(f"stages {stages} and growth {growth} must be non-empty, same length")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        channels = 2 * growth[0]
        self.stem = nn.Conv2d(in_chans, channels, 3, stem_stride, padding=1, bias=False)
        self.block_channels: list[int] = []
        blocks: list[nn.Module] = []
        for index, (num_layers, k) in enumerate(zip(stages, growth, strict=True)):
            activation = "hswish" if index >= hs_start_block else "relu"
            layers = []
            for _ in range(num_layers):
                layers.append(
                    DenseLayer(
                        channels,
                        k,
                        bottleneck=bottleneck,
                        group_1x1=groups,
                        group_3x3=group_3x3 or groups,
                        group_trans=group_trans or groups,
                        condense_factor=condense_factor or groups,
                        sparse_factor=sparse_factor or groups,
                        activation=activation,
                        use_se=index >= se_start_block,
                    )
                )
                channels += k
            self.block_channels.append(channels)
            if index < len(stages) - 1:
                layers.append(nn.AvgPool2d(2, 2))  # official `_Transition`: pooling only
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.norm_last = nn.BatchNorm2d(channels)
        self.relu_last = nn.ReLU(inplace=True)  # always ReLU, even in hard-swish blocks
        self.num_features = channels
        self.head_hidden_size = fc_channel
        # global pooling instead of official AvgPool2d(7 / 8): identical at 224 / 32 inputs
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.se_last = SELayer(channels, last_se_reduction)
        self.fc = nn.Linear(channels, fc_channel)
        self.fc_act = nn.Hardswish()
        self.classifier: nn.Module = (
            nn.Linear(fc_channel, num_classes) if num_classes > 0 else nn.Identity()
        )
        self._initialize()

    def _initialize(self) -> None:
        """Official `CondenseNetV2._initialize`: kaiming fan_out convs, BN weight 1 / bias 0.

        Like the official code (it runs after the layers are built), this also resets the SFRs'
        BN, overriding the official `SFR._init_weight` zero-init; linears keep PyTorch's default.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """The map after the final BN-ReLU, [B, num_features, H/s, W/s] (s = 32 on ImageNet
        configs, 4 on the CIFAR ones)."""
        return self.relu_last(self.norm_last(self.blocks(self.stem(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool -> SE -> flatten -> fc -> hard-swish [-> dropout -> classifier]."""
        x = self.se_last(self.global_pool(x)).flatten(1)
        x = self.fc_act(self.fc(x))
        if pre_logits:
            return x
        if self.drop_rate > 0:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final linear layer (nn.Identity when there are no classes)."""
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh `fc_channel -> num_classes` classifier (0 removes it)."""
        self.num_classes = num_classes
        self.classifier = (
            nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        )


# Official `cdnv2_a/b/c` (model/condensenetv2.py): G1x1 = G3x3 = Gtrans = C = S = groups.
IMAGENET_CONFIGS: dict[str, dict[str, Any]] = {
    "condensenetv2_a": dict(stages=(1, 1, 4, 6, 8), growth=(8, 8, 16, 32, 64), groups=8,
                            fc_channel=828),
    "condensenetv2_b": dict(stages=(2, 4, 6, 8, 6), growth=(6, 12, 24, 48, 96), groups=6,
                            fc_channel=1024),
    "condensenetv2_c": dict(stages=(4, 6, 8, 10, 8), growth=(8, 16, 32, 64, 128), groups=8,
                            fc_channel=1024),
}  # fmt: skip

# No official CIFAR builder. Inferred from the official numbers (sizes checked by
# tests/test_condensenetv2.py): official issue #2 trains `--stages 14-14-14 --growth 8-16-32` and the author
# measures 40.60M FLOPs / 1.22M params after conversion -- which is exactly this network with
# G = C = S = 8 and the ImageNet fc_channel 1024 (0.83M of the 1.22M are that fc); its 41M
# matches the README's CondenseNetV2-110. With fc_channel 128 the parameters match 0.48M. 146 - 110
# = 36 = 3 convs (LGC, 3x3, SFR) x 12 more layers, so -146 is 18-18-18 (60M / 0.75M official-style
# vs 62M / 0.78M). ReLU everywhere and no per-layer SE (unknown; they would change little).
CIFAR_CONFIGS: dict[str, dict[str, Any]] = {
    "cifar_condensenetv2_110": dict(stages=(14, 14, 14), growth=(8, 16, 32), groups=8,
                                    fc_channel=128),
    "cifar_condensenetv2_146": dict(stages=(18, 18, 18), growth=(8, 16, 32), groups=8,
                                    fc_channel=128),
    # small, for tests and CPU runs
    "cifar_condensenetv2_tiny": dict(stages=(2, 2, 2), growth=(8, 16, 32), groups=4,
                                     fc_channel=128),
}  # fmt: skip
for _cfg in CIFAR_CONFIGS.values():
    _cfg.update(stem_stride=1, hs_start_block=99, se_start_block=99)


def _cifar_cfg() -> dict[str, Any]:
    return cifar_cfg((8, 8), "stem") | {"classifier": "classifier"}


default_cfgs = generate_default_cfgs(
    {name: imagenet_cfg("stem", "classifier", "bicubic") for name in IMAGENET_CONFIGS}
    | {name: _cifar_cfg() for name in CIFAR_CONFIGS}
)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> CondenseNetV2:
    config = (IMAGENET_CONFIGS | CIFAR_CONFIGS)[variant]
    return build_model_with_cfg(
        CondenseNetV2, variant, pretrained,
        **(config | kwargs),
    )  # fmt: skip


@register_backbone(Capability.sparse_layers)
def condensenetv2_a(pretrained: bool = False, **kwargs: Any) -> CondenseNetV2:
    """CondenseNetV2-A (ImageNet): 46M MACs / 2.0M parameters converted (official README)."""
    return _create("condensenetv2_a", pretrained, **kwargs)


@register_backbone(Capability.sparse_layers)
def condensenetv2_b(pretrained: bool = False, **kwargs: Any) -> CondenseNetV2:
    """CondenseNetV2-B (ImageNet): 146M MACs / 3.6M parameters converted (official README)."""
    return _create("condensenetv2_b", pretrained, **kwargs)


@register_backbone(Capability.sparse_layers)
def condensenetv2_c(pretrained: bool = False, **kwargs: Any) -> CondenseNetV2:
    """CondenseNetV2-C (ImageNet): 309M MACs / 6.1M parameters converted (official README)."""
    return _create("condensenetv2_c", pretrained, **kwargs)


@register_backbone(Capability.sparse_layers)
def cifar_condensenetv2_110(pretrained: bool = False, **kwargs: Any) -> CondenseNetV2:
    """CondenseNetV2-110 (CIFAR, inferred config): official 41M MACs / 0.48M parameters."""
    return _create("cifar_condensenetv2_110", pretrained, **kwargs)


@register_backbone(Capability.sparse_layers)
def cifar_condensenetv2_146(pretrained: bool = False, **kwargs: Any) -> CondenseNetV2:
    """CondenseNetV2-146 (CIFAR, inferred config): official 62M MACs / 0.78M parameters."""
    return _create("cifar_condensenetv2_146", pretrained, **kwargs)


@register_backbone(Capability.sparse_layers)
def cifar_condensenetv2_tiny(pretrained: bool = False, **kwargs: Any) -> CondenseNetV2:
    """A 6-layer CondenseNetV2 (growth 8-16-32, G = C = S = 4) for tests and CPU runs."""
    return _create("cifar_condensenetv2_tiny", pretrained, **kwargs)
