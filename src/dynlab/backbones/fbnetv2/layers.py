"""The plain layers both FBNetV2 networks build from (mobile-vision's conv-BN-act, SE, IRF and skip
blocks, the pooled head), its width rounding and init, and the timm classifier API over them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import Tensor, nn

from dynlab.backbones._base import ClassifierAPI

ACTS = ("relu", "hswish")


def divisible_width(num: float, divisor: int = 8) -> int:
    """mobile-vision's `get_divisible_by` (mobile_cv/arch/utils/helper.py): the nearest multiple of
    `divisor` (half up), one more if that falls below 95% of `num`, at least `divisor`."""
    ret = int(num)
    if divisor > 0 and num % divisor != 0:
        ret = int((math.floor(num / divisor + 0.5) or 1) * divisor)
        if ret < 0.95 * num:
            ret += divisor
    return max(ret, divisor)


def se_width(mid: int, divisor: int = 8) -> int:
    """SE bottleneck width of a `mid`-wide block: IRFBlock's `int(mid * 0.25)` rounded by
    `build_se` with the width divisor (less_se_channels False, as FBNetV2's IRF_CFG)."""
    return divisible_width(int(mid * 0.25), divisor)


def activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "hswish":
        return nn.Hardswish()
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTS}")


class ConvBNAct(nn.Module):
    """Conv (no bias, 'same' padding) + BatchNorm + activation (none when `act` is None)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: str | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = activation(act) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    """mobile-vision's SEModule with the hard-sigmoid gate (`se_hsig`): x * gate(pool(x))."""

    def __init__(self, channels: int, mid: int, act: str) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, mid, 1)
        self.act = activation(act)
        self.expand = nn.Conv2d(mid, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = self.act(self.reduce(x.mean((2, 3), keepdim=True)))
        return x * self.gate(self.expand(s))


class BlockSpec(NamedTuple):
    """One block of a standalone net: an inverted-residual block (`op="ir"`) or mobile-vision's
    `skip` (identity, or a 1x1 conv + BN + ReLU projection when the shape changes)."""

    cin: int
    cout: int
    stride: int = 1
    mid: int = 0  # hidden width (0 for skip)
    kernel: int = 3
    act: str = "relu"
    se: int = 0  # SE bottleneck width, 0: no SE
    pw: bool = True  # the 1x1 expansion conv (mobile-vision drops it when cin == mid)
    residual: bool = False
    op: str = "ir"


def block_spec(value: Any) -> BlockSpec:
    """A BlockSpec from a BlockSpec, a mapping (Hydra) or a sequence, checked (ValueError)."""
    if isinstance(value, BlockSpec):
        spec = value
    elif isinstance(value, Mapping):
        spec = BlockSpec(**dict(value))
    else:
        spec = BlockSpec(*value)
    spec = BlockSpec(
        int(spec.cin),
        int(spec.cout),
        int(spec.stride),
        int(spec.mid),
        int(spec.kernel),
        str(spec.act),
        int(spec.se),
        bool(spec.pw),
        bool(spec.residual),
        str(spec.op),
    )
    problem = None
    if spec.op not in ("ir", "skip"):
        problem = f"op {spec.op!r} is not 'ir' or 'skip'"
    elif min(spec.cin, spec.cout) < 1 or spec.stride not in (1, 2):
        problem = "widths must be >= 1 and the stride 1 or 2"
    elif spec.residual and (spec.cin != spec.cout or spec.stride != 1):
        problem = "a residual needs cin == cout and stride 1"
    elif spec.op == "ir":
        if spec.mid < 1 or spec.kernel < 1 or spec.kernel % 2 == 0 or spec.se < 0:
            problem = "an ir block needs mid >= 1, an odd kernel and se >= 0"
        elif not spec.pw and spec.cin != spec.mid:
            problem = "without the pw conv the hidden width must equal cin"
        elif spec.act not in ACTS:
            problem = f"activation {spec.act!r} is not one of {ACTS}"
    if problem:
        raise ValueError(f"block {tuple(spec)}: {problem}")
    return spec


class IRBlock(nn.Module):
    """mobile-vision's IRFBlock: [pw 1x1+BN+act] -> dw kxk+BN+act -> [SE] -> pwl 1x1+BN
    (+ input when `residual`)."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.pw = ConvBNAct(spec.cin, spec.mid, act=spec.act) if spec.pw else None
        self.dw = ConvBNAct(
            spec.mid, spec.mid, spec.kernel, spec.stride, groups=spec.mid, act=spec.act
        )
        self.se = SqueezeExcite(spec.mid, spec.se, spec.act) if spec.se else None
        self.pwl = ConvBNAct(spec.mid, spec.cout)
        self.residual = spec.residual

    def forward(self, x: Tensor) -> Tensor:
        y = x if self.pw is None else self.pw(x)
        y = self.dw(y)
        if self.se is not None:
            y = self.se(y)
        y = self.pwl(y)
        return y + x if self.residual else y


class SkipBlock(nn.Module):
    """mobile-vision's `skip`: identity, or 1x1 conv + BN + ReLU when the shape changes."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        same = spec.cin == spec.cout and spec.stride == 1
        self.proj = None if same else ConvBNAct(spec.cin, spec.cout, 1, spec.stride, act="relu")

    def forward(self, x: Tensor) -> Tensor:
        return x if self.proj is None else self.proj(x)


def make_block(spec: BlockSpec) -> nn.Module:
    return IRBlock(spec) if spec.op == "ir" else SkipBlock(spec)


class FBNetHead(nn.Module):
    """Global average pool, 1x1 conv to the head width (no BN, IRPoolBlock's pwl) + hswish,
    dropout and the linear classifier (`fc`)."""

    def __init__(self, in_channels: int, width: int, num_classes: int, drop_rate: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 1, bias=False)
        self.act = nn.Hardswish()
        self.drop = nn.Dropout(drop_rate)
        self.width = width
        self.fc: nn.Module = nn.Identity()
        self.reset(num_classes)

    def reset(self, num_classes: int) -> None:
        """A fresh N(0, 0.01) classifier for `num_classes` (0: none)."""
        if num_classes > 0:
            device = self.conv.weight.device
            self.fc = nn.Linear(self.width, num_classes, device=device)
            nn.init.normal_(self.fc.weight, 0, 0.01)
            nn.init.zeros_(self.fc.bias)
        else:
            self.fc = nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.act(self.conv(x.mean((2, 3), keepdim=True))).flatten(1))
        return x if pre_logits else self.fc(x)


def init_weights(model: nn.Module) -> None:
    """mobile-vision's init: convs kaiming-normal (fan_out, relu), conv biases 0, BN 1/0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class FBNetClassifier(ClassifierAPI):
    """timm's classifier API over `forward_features` and an FBNetHead (`head`)."""

    head: FBNetHead
    num_features: int  # channels of forward_features' map (pre-pool), as timm's MobileNetV3
    head_hidden_size: int  # width of pre_logits

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one for `num_classes` (0 removes it)."""
        super().reset_classifier(num_classes)
        if hasattr(self, "config"):
            self.config = {**self.config, "num_classes": int(num_classes)}
