"""FBNetV2's standalone network of plain layers: a searched child or a published model
(`published.py`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from dynlab.backbones.fbnetv2.layers import (
    ConvBNAct,
    FBNetClassifier,
    FBNetHead,
    IRBlock,
    block_spec,
    divisible_width,
    init_weights,
    make_block,
)
from dynlab.nn.dmasking import subsample_nearest

RESIZES = ("bilinear", "nearest")


def resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """`x` resized to `size`: "bilinear" (align_corners False, no antialias), the published
    models' input resize (mobile-vision trains and tests them on bilinearly resized images), or
    "nearest", the supernet's subsampling (`subsample_nearest`); as is when already that size."""
    if mode == "nearest":
        return subsample_nearest(x, size)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


torch.fx.wrap("resize")  # a leaf for torch.fx (fold_batchnorm traces FBNetV2Net)


class FBNetV2Net(FBNetClassifier):
    """A standalone FBNetV2 network of plain Conv2d/BN/Linear layers: it resizes its input to
    `resolution` by `resize` ("bilinear" for published and exported nets, "nearest" for a
    supernet's child that must compute what the supernet does) when they differ, then stem 3x3 +
    BN + hswish, `blocks`, 1x1 to `head_pre` + BN + hswish, and the FBNetHead. `choices` records
    the supernet choice it came from (None for the published models)."""

    def __init__(
        self,
        blocks: Sequence[Any],
        stem_width: int = 16,
        stem_stride: int = 2,
        head_width: int = 1984,
        head_pre: int | None = None,
        resolution: int = 224,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        zero_last_bn_gamma: bool = False,
        choices: Mapping[str, Any] | None = None,
        resize: str = "bilinear",
    ) -> None:
        super().__init__()
        specs = [block_spec(b) for b in blocks]
        if not specs:
            raise ValueError("FBNetV2Net needs at least one block")
        cin = int(stem_width)
        for i, spec in enumerate(specs):
            if spec.cin != cin:
                raise ValueError(f"block {i} takes {spec.cin} channels but gets {cin}")
            cin = spec.cout
        if stem_stride not in (1, 2) or min(stem_width, head_width, resolution, in_chans) < 1:
            raise ValueError("FBNetV2Net: positive widths/resolution and a stem stride 1 or 2")
        if resize not in RESIZES:
            raise ValueError(f"FBNetV2Net: resize {resize!r} is not one of {RESIZES}")
        head_pre = divisible_width(cin * 6) if head_pre is None else int(head_pre)
        self.config: dict[str, Any] = {
            "blocks": [s._asdict() for s in specs],
            "stem_width": int(stem_width),
            "stem_stride": int(stem_stride),
            "head_width": int(head_width),
            "head_pre": head_pre,
            "resolution": int(resolution),
            "num_classes": int(num_classes),
            "in_chans": int(in_chans),
            "drop_rate": float(drop_rate),
            "zero_last_bn_gamma": bool(zero_last_bn_gamma),
            "choices": json_choices(choices) if choices is not None else None,
            "resize": resize,
        }
        self.specs = specs
        self.resolution = int(resolution)
        self.resize = resize
        self.choices = self.config["choices"]
        self.num_classes = int(num_classes)
        self.num_features = head_pre
        self.head_hidden_size = int(head_width)
        self._size = (self.resolution, self.resolution)
        self.stem = ConvBNAct(in_chans, stem_width, 3, stem_stride, act="hswish")
        self.blocks = nn.ModuleList(make_block(s) for s in specs)
        self.head_conv = ConvBNAct(cin, head_pre, 1, act="hswish")
        self.head = FBNetHead(head_pre, head_width, num_classes, drop_rate)
        init_weights(self)
        if zero_last_bn_gamma:  # IRF_CFG: the pwl BN of residual blocks starts at 0
            for block in self.blocks:
                if isinstance(block, IRBlock) and block.residual:
                    nn.init.zeros_(block.pwl.bn.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """The pre-pool map [B, head_pre, h, w] of the input resized to `resolution`."""
        x = self.stem(resize(x, self._size, self.resize))
        for block in self.blocks:
            x = block(x)
        return self.head_conv(x)


def json_choices(choices: Mapping[str, Any]) -> dict[str, Any]:
    """`choices` with plain ints (JSON-able)."""
    return {
        k: (list(map(int, v)) if isinstance(v, Sequence) else int(v)) for k, v in choices.items()
    }
