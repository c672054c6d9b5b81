"""FBNetV2's standalone network (a searched child or a published model, of plain layers) and the
published searched models F1-F4 as mobile-vision defines them (fbnet_modeldef_cls_fbnetv2.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.fx
from torch import Tensor, nn

from dynlab.backbones.fbnetv2.layers import (
    BlockSpec,
    ConvBNAct,
    FBNetClassifier,
    FBNetHead,
    IRBlock,
    block_spec,
    divisible_width,
    init_weights,
    make_block,
    se_width,
)
from dynlab.nn.dmasking import subsample_nearest

torch.fx.wrap("subsample_nearest")  # a leaf for torch.fx (fold_batchnorm traces FBNetV2Net)


class FBNetV2Net(FBNetClassifier):
    """A standalone FBNetV2 network of plain Conv2d/BN/Linear layers: it resizes its input to
    `resolution` (nearest, as the supernet subsamples) when they differ, then stem 3x3 + BN +
    hswish, `blocks`, 1x1 to `head_pre` + BN + hswish, and the FBNetHead. `choices` records the
    supernet choice it came from (None for the published models)."""

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
        }
        self.specs = specs
        self.resolution = int(resolution)
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
        x = self.stem(subsample_nearest(x, self._size))
        for block in self.blocks:
            x = block(x)
        return self.head_conv(x)


def json_choices(choices: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: (list(map(int, v)) if isinstance(v, Sequence) else int(v)) for k, v in choices.items()
    }


# --- the published searched models (mobile-vision fbnet_modeldef_cls_fbnetv2.py) ---------------
# Rows (op, out width, stride, repeats, expansion, kernel, SE, activation): `ir_k5_sehsig_hs` is
# ("ir", c, s, n, e, 5, True, "hswish"); `skip` rows carry only op, width, stride, repeats.
_F1_ROWS: tuple[tuple[Any, ...], ...] = (
    ("ir", 8, 1, 1, 1, 5, False, "relu"),
    ("ir", 24, 2, 1, 5.4566, 5, False, "relu"),
    ("ir", 24, 1, 1, 4.7912, 5, False, "relu"),
    ("ir", 32, 2, 1, 5.3501, 5, True, "relu"),
    ("ir", 24, 1, 1, 4.5379, 5, True, "relu"),
    ("ir", 56, 2, 1, 5.7133, 5, False, "hswish"),
    ("ir", 56, 1, 1, 4.1212, 3, False, "hswish"),
    ("ir", 56, 1, 1, 5.1246, 3, True, "hswish"),
    ("skip", 80, 1, 1),
    ("ir", 80, 1, 1, 4.5070, 5, True, "hswish"),
    ("ir", 80, 1, 1, 1.7712, 5, True, "hswish"),
    ("ir", 144, 2, 1, 4.5685, 3, True, "hswish"),
    ("ir", 144, 1, 1, 5.8400, 5, True, "hswish"),
    ("ir", 144, 1, 1, 6.8754, 5, True, "hswish"),
    ("skip", 224, 1, 1),
)
_F4_ROWS: tuple[tuple[Any, ...], ...] = (
    ("ir", 16, 1, 1, 1, 3, False, "hswish"),
    ("ir", 24, 2, 1, 5.4566, 5, False, "hswish"),
    ("ir", 24, 1, 2, 1.7912, 5, False, "hswish"),
    ("ir", 32, 2, 1, 5.3501, 5, True, "relu"),
    ("ir", 32, 1, 1, 3.5379, 5, True, "relu"),
    ("ir", 32, 1, 2, 4.5379, 5, True, "relu"),
    ("ir", 64, 2, 1, 5.7133, 5, False, "hswish"),
    ("ir", 64, 1, 1, 2.1212, 3, False, "hswish"),
    ("skip", 64, 1, 1),
    ("ir", 104, 1, 1, 5.0333, 3, False, "hswish"),
    ("ir", 104, 1, 1, 2.5070, 5, True, "hswish"),
    ("ir", 104, 1, 1, 1.7712, 5, True, "hswish"),
    ("ir", 112, 1, 1, 3.7712, 5, True, "hswish"),
    ("ir", 184, 2, 1, 5.5685, 3, True, "hswish"),
    ("ir", 184, 1, 1, 2.8400, 5, True, "hswish"),
    ("ir", 184, 1, 1, 4.8754, 5, True, "hswish"),
    ("skip", 224, 1, 1),
)
# name: stem width, rows, head width, resolution (F1/F2/F3 share blocks; F3 has the 1984 head).
PUBLISHED: dict[str, tuple[int, tuple[tuple[Any, ...], ...], int, int]] = {
    "fbnetv2_f1": (8, _F1_ROWS, 1600, 128),
    "fbnetv2_f2": (8, _F1_ROWS, 1600, 160),
    "fbnetv2_f3": (8, _F1_ROWS, 1984, 192),
    "fbnetv2_f4": (16, _F4_ROWS, 1984, 224),
}


def expand_rows(
    stem_width: int, rows: Sequence[Sequence[Any]], divisor: int = 8
) -> list[BlockSpec]:
    """mobile-vision's builder on `rows`: repeats at stride 1, mid = get_divisible_by(cin * e),
    no pw when cin == mid, SE width se_width(mid), residual when cin == cout at stride 1."""
    specs, cin = [], int(stem_width)
    for row in rows:
        op, cout, stride, repeats = row[0], int(row[1]), int(row[2]), int(row[3])
        for r in range(repeats):
            s = stride if r == 0 else 1
            residual = cin == cout and s == 1
            if op == "skip":
                specs.append(BlockSpec(cin, cout, s, op="skip"))
            else:
                e, k, se, act = row[4], int(row[5]), bool(row[6]), str(row[7])
                mid = divisible_width(cin * e, divisor)
                se_mid = se_width(mid, divisor) if se else 0
                specs.append(BlockSpec(cin, cout, s, mid, k, act, se_mid, cin != mid, residual))
            cin = cout
    return specs


def published_kwargs(name: str) -> dict[str, Any]:
    stem, rows, head_width, resolution = PUBLISHED[name]
    return {
        "blocks": expand_rows(stem, rows),
        "stem_width": stem,
        "stem_stride": 2,
        "head_width": head_width,
        "resolution": resolution,
        "zero_last_bn_gamma": True,  # IRF_CFG
    }
