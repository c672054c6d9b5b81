"""AngleNAS's MobileNet-like search space (Hu et al., ECCV 2020; the space its SPOS and ProxylessNAS
rows search), as timm backbones: the one-shot supernet (`anglenas_mobilenet_supernet`, and a
stride-1-stem variant for 32x32 inputs) and the standalone network of one architecture.

As the official megvii-model/AngleNAS SPOS/shrinking/super_model.py and torch_blocks.py: a 3x3
stride-2 stem to 40 channels (BN, ReLU6), a fixed MBConv of expansion 1 (depthwise 3x3, pointwise
to 24, no residual), 21 searchable layers in stages (32, 4, 2), (56, 4, 2), (112, 4, 2),
(128, 4, 1), (256, 4, 2), (432, 1, 1) (channels, layers, stride of the first), a 1x1 conv to 1728
(BN, ReLU6), global average pooling and a linear classifier. Each layer picks one of six inverted
residual blocks (`OPS`: kernel 3/5/7 x expansion 3/6; pointwise expand, depthwise with the stride,
pointwise linear, each with BN, ReLU6 after the first two; a residual when the stride is 1 and the
widths match) or identity (block id 6, the official -1), except the first layer of each stage
(layers 0, 4, 8, 12, 16, 20: official SPOS/shrinking/config.py `stage_last_id`), where the width or resolution
changes. 7^15 x 6^6 (about 2.2e17) architectures. BN is affine in the supernet, as the official;
convs are initialised N(0, sqrt(2 / (k * k * out))) (official), BN weight 1, bias 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import Tensor, nn

from dynlab.backbones._base import ClassifierAPI, cifar_cfg, imagenet_cfg, reinitialise
from dynlab.backbones.registry import register_backbone
from dynlab.backbones.spos_shufflenetv2 import MacsTable, SearchSpace
from dynlab.capabilities import Capability
from dynlab.evaluation.macs import count_macs

__all__ = ["OPS", "MobileNetSupernet", "MobileNetChild"]

OPS = ((3, 3), (3, 6), (5, 3), (5, 6), (7, 3), (7, 6))  # (kernel, expansion), official order
IDENTITY = len(OPS)
STAGES = ((32, 4, 2), (56, 4, 2), (112, 4, 2), (128, 4, 1), (256, 4, 2), (432, 1, 1))
# The official ABS-searched architecture (SPOS/training/script.sh; identity as 6): 472 M FLOPs.
OFFICIAL_ARCH = (2, 2, 6, 0, 0, 6, 6, 0, 5, 6, 4, 4, 0, 0, 4, 2, 3, 4, 4, 4, 3)


def _conv_bn(
    cin: int, cout: int, kernel: int, stride: int, groups: int, relu: bool
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """An inverted residual block (official torch_blocks.py InvertedResidual)."""

    def __init__(self, inp: int, oup: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = inp * expansion
        self.residual = stride == 1 and inp == oup
        units = [_conv_bn(mid, mid, kernel, stride, mid, True), _conv_bn(mid, oup, 1, 1, 1, False)]
        if expansion != 1:
            units.insert(0, _conv_bn(inp, mid, 1, 1, 1, True))
        self.convs = nn.ModuleList(units)

    def forward(self, x: Tensor) -> Tensor:
        y = x
        for unit in self.convs:
            y = unit(y)
        return x + y if self.residual else y

    def conv_weights(self) -> list[Tensor]:
        return [unit[0].weight for unit in self.convs]


def _specs() -> list[tuple[int, int, int]]:
    """(in, out, stride) of the 21 searchable layers."""
    specs, inp = [], 24
    for width, repeats, stride in STAGES:
        for i in range(repeats):
            specs.append((inp, width, stride if i == 0 else 1))
            inp = width
    return specs


def _space() -> SearchSpace:
    firsts = tuple(sum(r for _, r, _ in STAGES[:k]) for k in range(len(STAGES)))
    return SearchSpace(sum(r for _, r, _ in STAGES), IDENTITY + 1, 0, True, firsts)


def _init(model: nn.Module) -> None:
    """Official super_model.py: convs N(0, sqrt(2 / (k * k * out))), BN weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _MobileBase(ClassifierAPI):
    """Stem, fixed MBConv, last conv and classifier shared by the supernet and its children."""

    def __init__(self, num_classes: int, in_chans: int, cifar_stem: bool, drop_rate: float) -> None:
        super().__init__()
        self.config = {
            "num_classes": int(num_classes),
            "in_chans": int(in_chans),
            "cifar_stem": bool(cifar_stem),
        }
        self.drop_rate = drop_rate
        self.space = _space()
        self.specs = _specs()
        self.stem = _conv_bn(in_chans, 40, 3, 1 if cifar_stem else 2, 1, True)
        self.mbconv1 = MBConv(40, 24, 3, 1, 1)
        self.conv_last = _conv_bn(STAGES[-1][0], 1728, 1, 1, 1, True)
        self.num_features, self.num_classes = 1728, int(num_classes)
        self.drop = nn.Dropout(drop_rate)
        self.fc: nn.Module = nn.Linear(1728, num_classes) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(1728, num_classes) if num_classes else nn.Identity()
        self.num_classes = self.config["num_classes"] = int(num_classes)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(x.mean((2, 3)))
        return x if pre_logits else self.fc(x)

    def signature(self) -> dict[str, Any]:
        variant = "cifar_anglenas_mobilenet" if self.config["cifar_stem"] else "anglenas_mobilenet"
        return {"variant": variant, **self.config}

    def _stem(self, x: Tensor) -> Tensor:
        return self.mbconv1(self.stem(x))


class MobileNetSupernet(_MobileBase):
    """The one-shot supernet: every layer holds the six blocks; `forward` runs the path set by
    `set_path` (identity skips the layer)."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        cifar_stem: bool = False,
        drop_rate: float = 0.0,  # the official supernet has no dropout
    ) -> None:
        super().__init__(num_classes, in_chans, cifar_stem, drop_rate)
        self.layers = nn.ModuleList(
            nn.ModuleList(MBConv(i, o, k, s, e) for k, e in OPS) for i, o, s in self.specs
        )
        _init(self)
        self._path: tuple[int, ...] = (0,) * self.space.num_layers

    @property
    def path(self) -> tuple[int, ...]:
        return self._path

    def active(self) -> tuple[int, ...]:
        return self._path

    def set_path(self, genes: Sequence[int]) -> None:
        self._path = self._checked(genes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self._stem(x)
        for choices, block in zip(self.layers, self._path, strict=True):
            if block != IDENTITY:
                x = choices[block](x)
        return self.conv_last(x)

    def reset_weights(self) -> None:
        """Fresh weights and BN statistics, as at construction (from the torch RNG)."""
        reinitialise(self, _init)

    def layer_params(self, layer: int, block: int) -> list[nn.Parameter]:
        """The parameters of choice `block` of `layer` (identity has none)."""
        return [] if block == IDENTITY else list(self.layers[layer][block].parameters())

    def path_weights(self, genes: Sequence[int]) -> list[tuple[Any, Tensor]]:
        """The conv and classifier weights of a path, no BN, no biases (official shrinking.py
        get_arch_vector: stem, MBConv1, last conv, classifier, then each non-identity layer's
        three convs), named so that the same tensor has the same name in every path."""
        pieces: list[tuple[Any, Tensor]] = [("stem", self.stem[0].weight)]
        pieces += [(("mbconv1", u), w) for u, w in enumerate(self.mbconv1.conv_weights())]
        pieces.append(("conv_last", self.conv_last[0].weight))
        if isinstance(self.fc, nn.Linear):
            pieces.append(("fc", self.fc.weight))
        for i, block in enumerate(self._checked(genes)):
            if block != IDENTITY:
                pieces += [
                    ((i, block, u), w) for u, w in enumerate(self.layers[i][block].conv_weights())
                ]
        return pieces

    def child(self, genes: Sequence[int]) -> MobileNetChild:
        """The standalone net of `genes` with the supernet's weights and BN statistics."""
        net = self.standalone(genes).to(next(self.parameters()).device)
        kept = [(i, b) for i, b in enumerate(self._checked(genes)) if b != IDENTITY]
        net.stem.load_state_dict(self.stem.state_dict())
        net.mbconv1.load_state_dict(self.mbconv1.state_dict())
        net.conv_last.load_state_dict(self.conv_last.state_dict())
        net.fc.load_state_dict(self.fc.state_dict())
        for target, (i, b) in zip(net.layers, kept, strict=True):
            target.load_state_dict(self.layers[i][b].state_dict())
        return net.train(self.training)

    def standalone(self, genes: Sequence[int]) -> MobileNetChild:
        """A fresh standalone net of `genes` (identity layers left out, official
        SPOS/training/model.py)."""
        return MobileNetChild(self._checked(genes), drop_rate=self.drop_rate, **self.config)

    def macs_table(self, input_size: tuple[int, int, int]) -> MacsTable:
        """Per-layer MACs of every block (identity: 0) and of the fixed parts, measured on meta."""
        with torch.device("meta"):
            frame = MobileNetSupernet(**self.config).eval()
            x = torch.zeros(1, *input_size)
            fixed = count_macs(nn.Sequential(frame.stem, frame.mbconv1), input_size)
            x = frame.mbconv1(frame.stem(x))
            layers = []
            for choices in frame.layers:
                size = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
                layers.append([[float(count_macs(op, size))] for op in choices] + [[0.0]])
                x = choices[0](x)
            size = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
            head = nn.Sequential(frame.conv_last, nn.AdaptiveAvgPool2d(1), nn.Flatten(), frame.fc)
            fixed += count_macs(head, size)
        return MacsTable(self.space, fixed, layers, input_size)

    def _checked(self, genes: Sequence[int]) -> tuple[int, ...]:
        problem = self.space.problem(genes)
        if problem:
            raise ValueError(f"AngleNAS MobileNet candidate: {problem}")
        return tuple(int(g) for g in genes)


class MobileNetChild(_MobileBase):
    """The standalone network of one architecture of the space (identity layers left out)."""

    def __init__(
        self,
        arch: Sequence[int] = OFFICIAL_ARCH,
        num_classes: int = 1000,
        in_chans: int = 3,
        cifar_stem: bool = False,
        drop_rate: float = 0.2,  # official SPOS/training/model.py: dropout 0.2 before the FC
    ) -> None:
        super().__init__(num_classes, in_chans, cifar_stem, drop_rate)
        problem = self.space.problem(arch)
        if problem:
            raise ValueError(f"AngleNAS MobileNet architecture: {problem}")
        self.arch = tuple(int(b) for b in arch)
        self.layers = nn.ModuleList(
            MBConv(i, o, OPS[b][0], s, OPS[b][1])
            for (i, o, s), b in zip(self.specs, self.arch, strict=True)
            if b != IDENTITY
        )
        _init(self)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self._stem(x)
        for block in self.layers:
            x = block(x)
        return self.conv_last(x)


default_cfgs = generate_default_cfgs(
    {
        "anglenas_mobilenet_supernet": imagenet_cfg("stem.0", "fc", "bilinear"),
        "cifar_anglenas_mobilenet_supernet": cifar_cfg((2, 2), "stem.0"),
        "anglenas_mobilenet": imagenet_cfg("stem.0", "fc", "bilinear"),
    }
)


@register_backbone(Capability.spos_supernet)
def anglenas_mobilenet_supernet(pretrained: bool = False, **kwargs: Any) -> MobileNetSupernet:
    """AngleNAS's MobileNet-like one-shot supernet for ImageNet (224x224)."""
    return build_model_with_cfg(
        MobileNetSupernet, "anglenas_mobilenet_supernet", pretrained, **kwargs
    )


@register_backbone(Capability.spos_supernet)
def cifar_anglenas_mobilenet_supernet(pretrained: bool = False, **kwargs: Any) -> MobileNetSupernet:
    """The same space with a stride-1 stem, for 32x32 inputs."""
    return build_model_with_cfg(
        MobileNetSupernet,
        "cifar_anglenas_mobilenet_supernet",
        pretrained,
        cifar_stem=True,
        **kwargs,
    )


@register_backbone()
def anglenas_mobilenet(pretrained: bool = False, **kwargs: Any) -> MobileNetChild:
    """A standalone network of the space; by default the official ABS-searched SPOS architecture."""
    return build_model_with_cfg(MobileNetChild, "anglenas_mobilenet", pretrained, **kwargs)
