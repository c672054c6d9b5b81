"""FBNetV2's DMaskingNAS supernet (Wan et al., CVPR 2020) and its standalone networks as timm
backbones: `fbnetv2_f_supernet` (ImageNet), `cifar_fbnetv2_supernet` (32x32), and the published
searched models `fbnetv2_f1` .. `fbnetv2_f4` (mobile-vision, fbnet_modeldef_cls_fbnetv2.py).

Sources and how sure each part is ([paper-tr]: the paper read through a translation; [code]:
mobile-vision's code; [reimpl]: a third-party port; [inferred]: our own choice):
- Choices, each a Gumbel-softmax over logits `alpha_*` [paper-tr eq. 4]: per stage the output
  width (all blocks of a stage share it, so residual adds always match [inferred]); per block the
  hidden width (an expansion ratio times the block's largest input width, rounded like
  mobile-vision's `get_divisible_by(., 8)` [code]), the depthwise kernel (3 or 5) and SE on/off;
  and one input resolution for the network [paper-tr].
- Channel masking [paper-tr eqs. 1-3]: a block runs once at its widest. The hidden mask goes
  after the depthwise conv's BN + activation (pw and dw are per-channel maps of the hidden width,
  so one mask there equals masking the pw output, and it zeroes what SE and pwl read); the stage
  mask goes after the pwl BN, before the residual add. The insertion points are [inferred].
- The kernel choice runs one conv with the 5x5 weight times `g5 + g3 * centre(3x3)` [inferred];
  SE runs once and mixes `g_on * SE(h) + g_off * h` [inferred].
- Resolution [paper-tr Sec. 3 Fig. E]: every option subsamples the image (nearest), runs the body
  (stem .. the head's pre-pool 1x1 conv), and its map is placed back onto the largest option's
  output grid by interspersed zeros, then the maps are mixed and pooled normalised by the mixed
  occupancy (`dynlab.nn.dmasking`). Cost: one body pass per resolution option (the F space's
  224/192/160/128 costs ~2.6x one 224 pass).
- Expected cost [paper-tr eqs. 5-10; params: `k^2 C_in C_out / groups`, Sec. 3]: one routine,
  `expected_cost(kind)`, for MACs and parameters. Every searched layer's cost is its
  coefficients, measured once on one-channel copies of the layer (`count_macs` at its input size
  under each resolution, or the parameter count: weight, and per output channel BN affine /
  bias), times the expected widths `sum_i g_i c_i` propagated layer to layer; the fixed layers
  are measured whole. At a one-hot choice `expected_macs()` / `expected_params()` equal the
  exported child's `count_macs` / parameter count, exactly.
- Blocks [code: mobile-vision irf_block.IRFBlock]: pw 1x1 + BN + act, dw kxk + BN + act,
  SE (pool, 1x1 with bias to round8(int(mid / 4)), act, 1x1 with bias, hard sigmoid),
  pwl 1x1 + BN, residual when stride 1 and in == out. Head [code: IRPoolBlock `ir_pool_hs` +
  ClsConvHead]: 1x1 to round8(6 x last width) + BN + hswish, global pool, 1x1 to the head width
  + hswish (bias-free, as IRPoolBlock's default), classifier. Init: kaiming-normal fan_out convs.
  In the supernet the pw conv is kept even for e1 (the child keeps it too, so it stays exact).
- The F space [reimpl macro of a mobile_cv `fbnetv2_supernet` port, notes section 4]: stem 16 s2,
  a fixed `ir_k3_hs` 16 e1 block, then five stages of widths 16-28/4, 16-40/8, 48-96/8, 72-128/8,
  112-216/8, strides 2, 2, 2, 1, 2, repeats 3, 3, 3, 4, 4, head 1984. The paper's tables were not
  readable: expansions {1..6}, resolutions {224, 192, 160, 128} and the activations (relu in the
  two first searched stages, hswish after, as in F1) are [inferred].
- The CIFAR space is ours [inferred]: stem 16 s1, the fixed 16 e1 block, four stages down to 4x4
  at 32x32, expansions {1, 3, 6}, resolutions {32, 24, 16}.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from dynlab.backbones._base import ClassifierAPI, cifar_cfg, imagenet_cfg
from dynlab.evaluation.macs import count_macs
from dynlab.nn.dmasking import (
    ChannelMask,
    gumbel_weights,
    kernel_masks,
    mix_kernel,
    mix_placed,
    one_hot,
    receptive_positions,
    subsample_nearest,
)

__all__ = [
    "CHOICE_KEYS",
    "COST_KINDS",
    "PUBLISHED",
    "SPACES",
    "BlockSpec",
    "FBNetV2Net",
    "FBNetV2Supernet",
    "divisible_width",
    "expand_rows",
    "se_width",
    "space_config",
]

torch.fx.wrap("subsample_nearest")  # a leaf for torch.fx (fold_batchnorm traces FBNetV2Net)

ACTS = ("relu", "hswish")
CHOICE_KEYS = ("resolution", "widths", "expansions", "kernels", "se")
COST_KINDS = ("macs", "params")  # what expected_cost can take


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


def _act(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "hswish":
        return nn.Hardswish()
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTS}")


# --- plain layers (the standalone net) ----------------------------------------------------------
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
        self.act = _act(act) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    """mobile-vision's SEModule with the hard-sigmoid gate (`se_hsig`): x * gate(pool(x))."""

    def __init__(self, channels: int, mid: int, act: str) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, mid, 1)
        self.act = _act(act)
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


def _block_spec(value: Any) -> BlockSpec:
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


def _make_block(spec: BlockSpec) -> nn.Module:
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


def _init_weights(model: nn.Module) -> None:
    """mobile-vision's init: convs kaiming-normal (fan_out, relu), conv biases 0, BN 1/0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _Classifier(ClassifierAPI):
    """timm's classifier API over `forward_features` and an FBNetHead (`head`)."""

    head: FBNetHead
    num_features: int  # channels of forward_features' map (pre-pool), as timm's MobileNetV3
    head_hidden_size: int  # width of pre_logits

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one for `num_classes` (0 removes it)."""
        super().reset_classifier(num_classes)
        if hasattr(self, "config"):
            self.config = {**self.config, "num_classes": int(num_classes)}


# --- the standalone network ---------------------------------------------------------------------
class FBNetV2Net(_Classifier):
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
        specs = [_block_spec(b) for b in blocks]
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
            "choices": _json_choices(choices) if choices is not None else None,
        }
        self.specs = specs
        self.resolution = int(resolution)
        self.choices = self.config["choices"]
        self.num_classes = int(num_classes)
        self.num_features = head_pre
        self.head_hidden_size = int(head_width)
        self._size = (self.resolution, self.resolution)
        self.stem = ConvBNAct(in_chans, stem_width, 3, stem_stride, act="hswish")
        self.blocks = nn.ModuleList(_make_block(s) for s in specs)
        self.head_conv = ConvBNAct(cin, head_pre, 1, act="hswish")
        self.head = FBNetHead(head_pre, head_width, num_classes, drop_rate)
        _init_weights(self)
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


def _json_choices(choices: Mapping[str, Any]) -> dict[str, Any]:
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


def _published_kwargs(name: str) -> dict[str, Any]:
    stem, rows, head_width, resolution = PUBLISHED[name]
    return {
        "blocks": expand_rows(stem, rows),
        "stem_width": stem,
        "stem_stride": 2,
        "head_width": head_width,
        "resolution": resolution,
        "zero_last_bn_gamma": True,  # IRF_CFG
    }


# --- the supernet -------------------------------------------------------------------------------
_F_SPACE: dict[str, Any] = {
    "stem_width": 16,
    "stem_stride": 2,
    "first_width": 16,
    "stage_widths": (
        tuple(range(16, 29, 4)),
        tuple(range(16, 41, 8)),
        tuple(range(48, 97, 8)),
        tuple(range(72, 129, 8)),
        tuple(range(112, 217, 8)),
    ),
    "strides": (2, 2, 2, 1, 2),
    "repeats": (3, 3, 3, 4, 4),
    "acts": ("relu", "relu", "hswish", "hswish", "hswish"),
    "expansions": (1.0, 2.0, 3.0, 4.0, 5.0, 6.0),
    "kernels": (3, 5),
    "se": (False, True),
    "resolutions": (224, 192, 160, 128),
    "head_width": 1984,
}
_CIFAR_SPACE: dict[str, Any] = {
    "stem_width": 16,
    "stem_stride": 1,
    "first_width": 16,
    "stage_widths": ((16, 24), (24, 32, 40), (48, 64, 80), (96, 128, 160)),
    "strides": (1, 2, 2, 2),
    "repeats": (2, 3, 3, 2),
    "acts": ("relu", "relu", "hswish", "hswish"),
    "expansions": (1.0, 3.0, 6.0),
    "kernels": (3, 5),
    "se": (False, True),
    "resolutions": (32, 24, 16),
    "head_width": 1024,
}
SPACES = {"fbnetv2_f": _F_SPACE, "cifar": _CIFAR_SPACE}
_VARIANTS = {"fbnetv2_f": "fbnetv2_f_supernet", "cifar": "cifar_fbnetv2_supernet"}


def _ints(name: str, values: Any, minimum: int = 1) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of ints, got {values!r}") from None
    if not out or min(out) < minimum or any(isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be a non-empty list of ints >= {minimum}, got {values!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has duplicate options: {list(out)}")
    return out


def space_config(space: str = "fbnetv2_f", **overrides: Any) -> dict[str, Any]:
    """The supernet's space: preset `space` ("fbnetv2_f" or "cifar") with the non-None
    `overrides`, normalised and checked (ValueError, one line). When `stage_widths` changes the
    number of stages and strides/acts/repeats are not given: the preset's first stride then 2s,
    relu for the first half of the stages and hswish after, one block per stage."""
    if space not in SPACES:
        raise ValueError(f"unknown FBNetV2 space {space!r}; expected one of {sorted(SPACES)}")
    preset = SPACES[space]
    unknown = set(overrides) - set(preset)
    if unknown:
        raise ValueError(f"unknown FBNetV2 space settings {sorted(unknown)}")
    c = {**preset, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        stages = tuple(tuple(s) for s in c["stage_widths"])
    except TypeError:
        raise ValueError(
            f"stage_widths must be a list of width lists, got {c['stage_widths']!r}"
        ) from None
    n = len(stages)
    if n == 0:
        raise ValueError("stage_widths needs at least one stage")
    if n != len(preset["stage_widths"]):
        if overrides.get("strides") is None:
            c["strides"] = (preset["strides"][0],) + (2,) * (n - 1)
        if overrides.get("acts") is None:
            c["acts"] = tuple("relu" if i < (n + 1) // 2 else "hswish" for i in range(n))
        if overrides.get("repeats") is None:
            c["repeats"] = (1,) * n
    out: dict[str, Any] = {
        "space": space,
        "stage_widths": tuple(_ints(f"stage_widths[{i}]", s) for i, s in enumerate(stages)),
        "strides": tuple(int(s) for s in c["strides"]),
        "repeats": tuple(int(r) for r in c["repeats"]),
        "acts": tuple(str(a) for a in c["acts"]),
        "expansions": tuple(float(e) for e in c["expansions"]),
        "kernels": _ints("kernels", c["kernels"]),
        "se": tuple(bool(s) for s in c["se"]),
        "resolutions": _ints("resolutions", c["resolutions"]),
        "stem_width": int(c["stem_width"]),
        "stem_stride": int(c["stem_stride"]),
        "first_width": int(c["first_width"]),
        "head_width": int(c["head_width"]),
    }
    for key in ("strides", "repeats", "acts"):
        if len(out[key]) != n:
            raise ValueError(f"{key} has {len(out[key])} entries for {n} stages")
    if any(s not in (1, 2) for s in out["strides"]) or out["stem_stride"] not in (1, 2):
        raise ValueError(
            f"strides must be 1 or 2, got stem {out['stem_stride']}, {list(out['strides'])}"
        )
    if min(out["repeats"]) < 1:
        raise ValueError(
            f"every stage needs at least one block, got repeats {list(out['repeats'])}"
        )
    if any(a not in ACTS for a in out["acts"]):
        raise ValueError(f"acts must be among {ACTS}, got {list(out['acts'])}")
    e = out["expansions"]
    if not e or min(e) <= 0 or len(set(e)) != len(e):
        raise ValueError(f"expansions must be distinct ratios > 0, got {list(e)}")
    if any(k % 2 == 0 for k in out["kernels"]):
        raise ValueError(f"kernels must be odd, got {list(out['kernels'])}")
    if not out["se"] or len(set(out["se"])) != len(out["se"]):
        raise ValueError(f"se options must be distinct booleans, got {list(out['se'])}")
    if min(out["stem_width"], out["head_width"]) < 1 or out["first_width"] < 0:
        raise ValueError("stem_width and head_width must be >= 1, first_width >= 0 (0: none)")
    return out


class _SearchBlock(NamedTuple):
    """A searchable block: stage, max input width, hidden width options, stride, residual."""

    stage: int
    in_max: int
    mids: tuple[int, ...]
    se_mids: tuple[int, ...]
    stride: int
    residual: bool
    act: str


class DMaskBlock(nn.Module):
    """A masked inverted-residual block at its widest: pw, one dw at the largest kernel (the
    kernel choice mixes centre masks into its weight), the hidden-width mask, SE mixed on/off,
    pwl + BN and the stage's width mask before the residual add."""

    def __init__(
        self, b: _SearchBlock, out_max: int, kernels: Sequence[int], se: Sequence[bool]
    ) -> None:
        super().__init__()
        mid, kmax = max(b.mids), max(kernels)
        self.pw = ConvBNAct(b.in_max, mid, act=b.act)
        self.dw = ConvBNAct(mid, mid, kmax, b.stride, groups=mid, act=b.act)
        self.register_buffer("kernel_masks", kernel_masks(kernels, kmax), persistent=False)
        self.hidden = ChannelMask(b.mids)
        self.se_options = tuple(se)
        if any(self.se_options):
            self.se_reduce = nn.Conv2d(mid, max(b.se_mids), 1)
            self.se_act = _act(b.act)
            self.se_mask = ChannelMask(b.se_mids)
            self.se_expand = nn.Conv2d(max(b.se_mids), mid, 1)
            self.se_gate = nn.Hardsigmoid()
        self.pwl = ConvBNAct(mid, out_max)
        self.residual = b.residual

    def forward(
        self, x: Tensor, g_mid: Tensor, g_kernel: Tensor, g_se: Tensor, out_mask: Tensor
    ) -> Tensor:
        h = self.pw(x)
        conv = self.dw.conv
        weight = mix_kernel(conv.weight, g_kernel, self.kernel_masks)
        h = F.conv2d(h, weight, None, conv.stride, conv.padding, groups=conv.groups)
        h = self.hidden(self.dw.act(self.dw.bn(h)), g_mid)
        if any(self.se_options):
            s = self.se_act(self.se_reduce(h.mean((2, 3), keepdim=True)))
            excited = h * self.se_gate(self.se_expand(self.se_mask(s, g_mid)))
            mixed = None
            for i, on in enumerate(self.se_options):
                term = (excited if on else h) * g_se[i].to(h.dtype)
                mixed = term if mixed is None else mixed + term
            h = mixed
        y = self.pwl(h) * out_mask.to(h.dtype).view(1, -1, 1, 1)
        return y + x if self.residual else y


@functools.lru_cache(maxsize=4096)
def _out_hw(kernel: int, stride: int, h: int, w: int) -> tuple[int, int]:
    """Output size of a `kernel` x `kernel` 'same'-padded conv at `stride` on h x w (meta run)."""
    with torch.device("meta"):
        y = nn.Conv2d(1, 1, kernel, stride, kernel // 2, bias=False)(torch.empty(1, 1, h, w))
    return int(y.shape[-2]), int(y.shape[-1])


def _measure(kind: str, module: nn.Module, size: tuple[int, int, int]) -> int:
    """The `kind` cost of `module` (built on meta) on one (C, H, W) input: its count_macs for
    "macs", its parameter count (weights, biases, BN affines) for "params"."""
    if kind == "macs":
        return count_macs(module, size)
    return sum(p.numel() for p in module.parameters())


@functools.lru_cache(maxsize=4096)
def _unit_layer(kind: str, layer: str, kernel: int, stride: int, h: int, w: int) -> tuple[int, int]:
    """A layer's `kind` cost per C_in x C_out / groups (its weight) and per output channel (BN
    affine, bias), measured on one-channel copies on h x w inputs: `layer` "conv_bn" is ConvBNAct,
    "conv_bias" a biased Conv2d (SE). A depthwise layer costs their sum per channel."""
    with torch.device("meta"):
        weight = nn.Conv2d(1, 1, kernel, stride, kernel // 2, bias=False)
        if layer == "conv_bn":
            whole: nn.Module = ConvBNAct(1, 1, kernel, stride)
        elif layer == "conv_bias":
            whole = nn.Conv2d(1, 1, kernel, stride, kernel // 2)
        else:
            raise ValueError(f"unknown unit layer {layer!r}")
    unit = _measure(kind, weight, (1, h, w))
    return unit, _measure(kind, whole, (1, h, w)) - unit


@functools.lru_cache(maxsize=64)
def _head_cost(kind: str, in_channels: int, width: int, num_classes: int) -> int:
    """The `kind` cost of the post-pool FBNetHead (1x1 conv, classifier), measured on meta."""
    with torch.device("meta"):
        head = FBNetHead(in_channels, width, num_classes, 0.0)
    return _measure(kind, head, (in_channels, 1, 1))


class _CostTable(NamedTuple):
    """One cost kind's measured coefficients. Rows run over geometries: every resolution option
    for MACs, one for parameters (no input size changes them). Pairs are (per C_in x C_out, per
    C_out) of a ConvBNAct (see `_unit_layer`)."""

    fixed: list[int]  # [geo] the stem and the fixed first block at their widths
    pw: list[list[tuple[int, int]]]  # [block][geo]
    dw: list[list[list[int]]]  # [block][kernel][geo] per hidden channel
    se: list[list[int]]  # [block][expansion] the SE of that hidden width and its bottleneck
    pwl: list[list[tuple[int, int]]]  # [block][geo]
    head: list[tuple[int, int]]  # [geo] the pre-pool head conv


class FBNetV2Supernet(_Classifier):
    """The DMaskingNAS supernet: masked widest blocks, Gumbel-softmax choices (train), argmax
    (eval) or fixed one-hot weights; `expected_macs()` / `expected_params()` are the
    differentiable costs of the last forward's weights. Space kwargs override the `space`
    preset (see `space_config`)."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        space: str = "fbnetv2_f",
        stage_widths: Sequence[Sequence[int]] | None = None,
        strides: Sequence[int] | None = None,
        repeats: Sequence[int] | None = None,
        acts: Sequence[str] | None = None,
        expansions: Sequence[float] | None = None,
        kernels: Sequence[int] | None = None,
        se: Sequence[bool] | None = None,
        resolutions: Sequence[int] | None = None,
        stem_width: int | None = None,
        stem_stride: int | None = None,
        first_width: int | None = None,
        head_width: int | None = None,
        tau: float = 1.0,
        hard: bool = False,
    ) -> None:
        super().__init__()
        space_kw = {
            "stage_widths": stage_widths,
            "strides": strides,
            "repeats": repeats,
            "acts": acts,
            "expansions": expansions,
            "kernels": kernels,
            "se": se,
            "resolutions": resolutions,
            "stem_width": stem_width,
            "stem_stride": stem_stride,
            "first_width": first_width,
            "head_width": head_width,
        }
        c = space_config(space, **space_kw)
        if num_classes < 0 or in_chans < 1:
            raise ValueError(
                f"num_classes must be >= 0 and in_chans >= 1, got {num_classes}, {in_chans}"
            )
        self.config: dict[str, Any] = {
            **c,
            "num_classes": int(num_classes),
            "in_chans": int(in_chans),
            "drop_rate": float(drop_rate),
        }
        self.tau, self.hard = float(tau), bool(hard)
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.resolutions: tuple[int, ...] = c["resolutions"]
        self.stage_widths: tuple[tuple[int, ...], ...] = c["stage_widths"]
        self.kernels: tuple[int, ...] = c["kernels"]
        self.se_options: tuple[bool, ...] = c["se"]

        # the fixed layers and the searchable blocks
        self.stem = ConvBNAct(in_chans, c["stem_width"], 3, c["stem_stride"], act="hswish")
        width = c["stem_width"]
        self.first_spec: BlockSpec | None = None
        self.first: IRBlock | None = None
        if c["first_width"]:  # mobile-vision stage 1: `ir_k3_hs` e1, fixed
            mid = divisible_width(width * 1.0)
            self.first_spec = BlockSpec(
                cin=width,
                cout=c["first_width"],
                mid=mid,
                kernel=3,
                act="hswish",
                pw=width != mid,
                residual=width == c["first_width"],
            )
            self.first = IRBlock(self.first_spec)
            width = c["first_width"]
        self.base_width = width
        self.search_blocks: list[_SearchBlock] = []
        for s, (widths, stride, repeats, act) in enumerate(
            zip(c["stage_widths"], c["strides"], c["repeats"], c["acts"], strict=True)
        ):
            for j in range(repeats):
                in_max = width if j == 0 else max(widths)
                mids = tuple(divisible_width(in_max * e) for e in c["expansions"])
                se_mids = tuple(se_width(m) for m in mids)
                if max(se_mids) != se_width(max(mids)):
                    raise ValueError(
                        f"block {len(self.search_blocks)}: SE widths {se_mids} not monotone"
                    )
                self.search_blocks.append(
                    _SearchBlock(s, in_max, mids, se_mids, stride if j == 0 else 1, j > 0, act)
                )
            width = max(widths)
        self.stages = nn.ModuleList(
            nn.ModuleList(
                DMaskBlock(b, max(self.stage_widths[s]), self.kernels, self.se_options)
                for b in self.search_blocks
                if b.stage == s
            )
            for s in range(len(self.stage_widths))
        )
        self.width_masks = nn.ModuleList(ChannelMask(w) for w in self.stage_widths)
        self.head_pre = divisible_width(width * 6)
        self.head_conv = ConvBNAct(width, self.head_pre, 1, act="hswish")
        self.head = FBNetHead(self.head_pre, c["head_width"], num_classes, drop_rate)
        self.num_features = self.head_pre
        self.head_hidden_size = c["head_width"]
        _init_weights(self)

        # architecture logits (uniform at start: argmax picks the first option of each)
        self._alpha_names: dict[str, list[str]] = {k: [] for k in CHOICE_KEYS}

        def alpha(key: str, name: str, n: int) -> None:
            self.register_parameter(name, nn.Parameter(torch.zeros(n)))
            self._alpha_names[key].append(name)

        alpha("resolution", "alpha_resolution", len(self.resolutions))
        for s, widths in enumerate(self.stage_widths):
            alpha("widths", f"alpha_width_{s}", len(widths))
        for i in range(len(self.search_blocks)):
            alpha("expansions", f"alpha_expansion_{i}", len(c["expansions"]))
            alpha("kernels", f"alpha_kernel_{i}", len(self.kernels))
            alpha("se", f"alpha_se_{i}", len(self.se_options))

        self._geometry()
        self._fixed: dict[str, Any] | None = None
        self._last: dict[str, Any] | None = None
        self._costs: dict[str, _CostTable] = {}
        self._cost_cache: dict[tuple[str, str], dict[str, Tensor]] = {}

    # --- geometry: sizes per resolution option, placement on the full grid -------------------
    def _geometry(self) -> None:
        """Per resolution option: every layer's input size (meta runs of unit convs), the output
        map size and its placement on the largest option's grid (ValueError when it cannot)."""
        c = self.config
        total_stride = c["stem_stride"] * math.prod(b.stride for b in self.search_blocks)
        self._sizes: list[dict[str, Any]] = []
        for r in self.resolutions:
            stem_out = _out_hw(3, c["stem_stride"], r, r)
            hw, block_in, block_out = stem_out, [], []
            for b in self.search_blocks:
                block_in.append(hw)
                hw = _out_hw(max(self.kernels), b.stride, *hw)
                block_out.append(hw)
            self._sizes.append(
                {
                    "input": (r, r),
                    "stem_out": stem_out,
                    "in": block_in,
                    "out": block_out,
                    "final": hw,
                }
            )
        full = max(range(len(self.resolutions)), key=lambda i: self.resolutions[i])
        self.full_index = full
        self.grid: tuple[int, int] = self._sizes[full]["final"]
        self.positions: list[tuple[list[int], list[int]]] = []
        for r, sizes in zip(self.resolutions, self._sizes, strict=True):
            h, w = sizes["final"]
            R = self.resolutions[full]
            rows = receptive_positions(h, r, R, total_stride)
            cols = receptive_positions(w, r, R, total_stride)
            if rows[-1] >= self.grid[0] or cols[-1] >= self.grid[1] or len(set(rows)) != len(rows):
                raise ValueError(
                    f"resolution option {r}: its {h}x{w} output map does not fit the {self.grid[0]}x"
                    f"{self.grid[1]} map of option {R} pixel for pixel; use options whose ratio to "
                    f"{R} keeps maps of at most one pixel per grid cell, e.g. multiples of the total "
                    f"stride {total_stride}"
                )
            self.positions.append((rows, cols))

    # --- choices ------------------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        """Every choice's logits (named alpha_*), resolution first."""
        return [getattr(self, n) for k in CHOICE_KEYS for n in self._alpha_names[k]]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an architecture logit."""
        alphas = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in alphas]

    def _alphas(self, key: str) -> list[Tensor]:
        return [getattr(self, n) for n in self._alpha_names[key]]

    def active(self) -> dict[str, Any]:
        """The architecture `forward` runs in eval mode (the argmax, or the fixed choices), what
        `child` of it cuts out."""
        return self.fixed if self.fixed is not None else self.choices()

    def choices(self) -> dict[str, Any]:
        """The argmax of every logit group (indices into the options), JSON-able (one sync)."""
        alphas = self.arch_parameters()
        flat = torch.stack([t.detach().argmax() for t in alphas]).tolist()
        out: dict[str, Any] = {}
        for k in CHOICE_KEYS:
            n = len(self._alpha_names[k])
            out[k], flat = (flat[0] if k == "resolution" else flat[:n]), flat[n:]
        return out

    def _option_counts(self) -> dict[str, list[int]]:
        return {k: [t.numel() for t in self._alphas(k)] for k in CHOICE_KEYS}

    def choice_problem(self, choices: Any) -> str | None:
        """What is wrong with `choices` (one line), or None when it is a choice of this space."""
        if not isinstance(choices, Mapping) or set(choices) != set(CHOICE_KEYS):
            got = sorted(choices) if isinstance(choices, Mapping) else type(choices).__name__
            return f"choices must be a mapping with keys {list(CHOICE_KEYS)}, got {got}"
        counts = self._option_counts()
        for key in CHOICE_KEYS:
            value = choices[key]
            values = [value] if key == "resolution" else value
            if key != "resolution" and (
                isinstance(value, (str, bytes)) or not isinstance(value, Sequence)
            ):
                return (
                    f"choices[{key!r}] must be a list of {len(counts[key])} indices, got {value!r}"
                )
            if len(values) != len(counts[key]):
                return (
                    f"choices[{key!r}] has {len(values)} entries, the space has {len(counts[key])}"
                )
            for i, (v, n) in enumerate(zip(values, counts[key], strict=True)):
                if isinstance(v, bool) or not hasattr(v, "__index__") or not 0 <= int(v) < n:
                    where = key if key == "resolution" else f"{key}[{i}]"
                    return f"choices {where} is {v!r}, expected an int in 0..{n - 1}"
        return None

    def _checked(self, choices: Mapping[str, Any]) -> dict[str, Any]:
        problem = self.choice_problem(choices)
        if problem:
            raise ValueError(f"FBNetV2 supernet: {problem}")
        return _json_choices(choices)

    def decode(self, choices: Mapping[str, Any]) -> dict[str, Any]:
        """The option values of `choices`: resolution, stage widths, hidden widths, kernels, SE."""
        c = self._checked(choices)
        return {
            "resolution": self.resolutions[c["resolution"]],
            "widths": [w[i] for w, i in zip(self.stage_widths, c["widths"], strict=True)],
            "mids": [b.mids[i] for b, i in zip(self.search_blocks, c["expansions"], strict=True)],
            "kernels": [self.kernels[i] for i in c["kernels"]],
            "se": [self.se_options[i] for i in c["se"]],
        }

    def fix(self, choices: Mapping[str, Any]) -> None:
        """Force one-hot weights at `choices` (train and eval) until `unfix()`; the expected
        costs then read them until the next forward."""
        self._fixed = self._checked(choices)
        self._last = None

    def unfix(self) -> None:
        """Back to Gumbel samples (train) / argmax (eval) from the next forward."""
        self._fixed = None
        self._last = None

    @property
    def fixed(self) -> dict[str, Any] | None:
        """The choices `fix` forced, or None."""
        return None if self._fixed is None else dict(self._fixed)

    def _draw(self) -> tuple[dict[str, Any], int | None]:
        """Weights for one forward, and the resolution index when they are constant one-hot."""
        if self._fixed is not None or not self.training:
            c = self._fixed if self._fixed is not None else self.choices()
            ref = self.alpha_resolution
            w: dict[str, Any] = {"resolution": one_hot(c["resolution"], ref.numel(), ref)}
            for k in CHOICE_KEYS[1:]:
                w[k] = [
                    one_hot(i, t.numel(), t) for i, t in zip(c[k], self._alphas(k), strict=True)
                ]
            return w, c["resolution"]
        sample = lambda t: gumbel_weights(t, self.tau, self.hard)  # noqa: E731
        w = {"resolution": sample(self.alpha_resolution)}
        for k in CHOICE_KEYS[1:]:
            w[k] = [sample(t) for t in self._alphas(k)]
        return w, None

    def last_weights(self) -> dict[str, Any]:
        """The choice weights of the last forward (what the expected costs use)."""
        if self._last is None:
            self._last, _ = self._draw()
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._last.items()}

    # --- forward ------------------------------------------------------------------------------
    def _body(self, x: Tensor, w: Mapping[str, Any]) -> Tensor:
        """Stem .. last stage .. the head's pre-pool conv at one resolution, masked by `w`."""
        x = self.stem(x)
        if self.first is not None:
            x = self.first(x)
        b = 0
        for s, stage in enumerate(self.stages):
            out_mask = self.width_masks[s].mask(w["widths"][s])
            for block in stage:
                x = block(x, w["expansions"][b], w["kernels"][b], w["se"][b], out_mask)
                b += 1
        return self.head_conv(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """The resolution-mixed pre-pool map on the largest option's grid, scaled so that its
        plain average is the occupancy-normalised pool (see `dynlab.nn.dmasking.mix_placed`).
        One body pass per resolution option whose weight can be non-zero."""
        w, index = self._draw()
        self._last = w
        maps, weights, positions = [], [], []
        for i, r in enumerate(self.resolutions):
            if index is not None and i != index:
                continue  # a constant zero weight: the pass would add exactly nothing
            maps.append(self._body(subsample_nearest(x, (r, r)), w))
            weights.append(w["resolution"][i])
            positions.append(self.positions[i])
        return mix_placed(maps, weights, self.grid, positions)

    # --- expected cost ------------------------------------------------------------------------
    def _cost_table(self, kind: str) -> _CostTable:
        """The `kind` coefficients of every layer (every resolution option for MACs), measured
        once on meta: the fixed layers whole, the searched ones at unit widths."""
        if kind in self._costs:
            return self._costs[kind]
        c = self.config
        geos = self._sizes if kind == "macs" else self._sizes[:1]
        with torch.device("meta"):
            stem = ConvBNAct(self.in_chans, c["stem_width"], 3, c["stem_stride"], act="hswish")
            first = None if self.first_spec is None else IRBlock(self.first_spec)
        fixed = []
        for sz in geos:
            cost = _measure(kind, stem, (self.in_chans, *sz["input"]))
            if first is not None:
                cost += _measure(kind, first, (c["stem_width"], *sz["stem_out"]))
            fixed.append(cost)
        blocks = range(len(self.search_blocks))
        se_w, se_out = _unit_layer(kind, "conv_bias", 1, 1, 1, 1)  # on the pooled 1x1 map

        def conv_bn(j: int, key: str, kernel: int = 1, stride: int = 1) -> list[tuple[int, int]]:
            return [_unit_layer(kind, "conv_bn", kernel, stride, *sz[key][j]) for sz in geos]

        self._costs[kind] = _CostTable(
            fixed=fixed,
            pw=[conv_bn(j, "in") for j in blocks],
            dw=[
                [[sum(u) for u in conv_bn(j, "in", k, b.stride)] for k in self.kernels]
                for j, b in enumerate(self.search_blocks)
            ],
            # reduce mid -> s and expand s -> mid, both biased: exact per hidden option, as the
            # bottleneck s = se_width(mid) is a rounded function of mid
            se=[
                [
                    2 * se_w * m * s + se_out * (m + s)
                    for m, s in zip(b.mids, b.se_mids, strict=True)
                ]
                for b in self.search_blocks
            ],
            pwl=[conv_bn(j, "out") for j in blocks],
            head=[_unit_layer(kind, "conv_bn", 1, 1, *sz["final"]) for sz in geos],
        )
        return self._costs[kind]

    def _cost_tensors(self, kind: str, device: torch.device) -> dict[str, Tensor]:
        """The `kind` cost table as float64 tensors on `device` (built once per kind and device):
        [geo] fixed, [block, geo, 2] pw/pwl, [block, kernel, geo] dw, [block, expansion] SE,
        [geo, 2] head conv (times its width), with the width options."""
        key = (kind, str(device))
        if key not in self._cost_cache:
            t = self._cost_table(kind)
            kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
            self._cost_cache[key] = {
                "fixed": torch.tensor(t.fixed, **kw),
                "pw": torch.tensor(t.pw, **kw),
                "dw": torch.tensor(t.dw, **kw),
                "se": torch.tensor(t.se, **kw),
                "pwl": torch.tensor(t.pwl, **kw),
                "head": torch.tensor(t.head, **kw) * float(self.head_pre),
                "mids": torch.tensor([b.mids for b in self.search_blocks], **kw),
                "se_on": torch.tensor([float(on) for on in self.se_options], **kw),
                "stage_of": torch.tensor([b.stage for b in self.search_blocks], device=device),
                **{f"widths_{i}": torch.tensor(w, **kw) for i, w in enumerate(self.stage_widths)},
            }
        return self._cost_cache[key]

    def softmax_weights(self) -> dict[str, Any]:
        """The search's distribution itself (every logit group's softmax, no noise): its
        `expected_cost(kind, weights)` is the expected cost of the architectures it samples."""
        w: dict[str, Any] = {"resolution": self.alpha_resolution.softmax(-1)}
        return w | {k: [t.softmax(-1) for t in self._alphas(k)] for k in CHOICE_KEYS[1:]}

    def expected_cost(self, kind: str = "macs", weights: Mapping[str, Any] | None = None) -> Tensor:
        """Expected cost of the exported child under the last forward's weights, or `weights`
        such as `softmax_weights()` (float64 scalar, differentiable in the logits; paper eqs.
        5-10): `kind` "macs" (per sample) or "params" (the count). Effective widths
        `sum_i g_i c_i` propagate layer to layer; each layer costs its
        measured coefficients times its expected input and output widths (plus a per-output-
        channel term: BN affines, biases), mixed over the resolution options for MACs (parameters
        do not depend on them: the resolution gets no gradient); depthwise: one width times the
        kernel mix; SE: g_on times its exact expectation over the hidden options. The choices are
        independent, so this is the exact expectation, and at one-hot weights exactly the
        child's count_macs / parameter count."""
        if kind not in COST_KINDS:
            raise ValueError(f"unknown cost kind {kind!r}; expected one of {COST_KINDS}")
        w = self.last_weights() if weights is None else weights
        res = w["resolution"].double()
        t = self._cost_tensors(kind, res.device)
        geo = res if kind == "macs" else res.new_ones(1)  # the geometries' weights
        stage_w = torch.stack(
            [(g.double() * t[f"widths_{i}"]).sum() for i, g in enumerate(w["widths"])]
        )
        e_out = stage_w[t["stage_of"]]  # each block's expected output width
        e_in = torch.cat([stage_w.new_full((1,), float(self.base_width)), e_out[:-1]])
        g_mid = torch.stack(w["expansions"]).double()
        e_mid = (g_mid * t["mids"]).sum(-1)
        g_k = torch.stack(w["kernels"]).double()
        dw = (g_k * (t["dw"] @ geo)).sum(-1)
        g_on = torch.stack(w["se"]).double() @ t["se_on"]
        pw = (t["pw"] * geo[:, None]).sum(-2)  # [block, (per in x out, per out)]
        pwl = (t["pwl"] * geo[:, None]).sum(-2)
        head = (t["head"] * geo[:, None]).sum(-2)
        per_block = (
            (pw[:, 0] * e_in + pw[:, 1]) * e_mid
            + dw * e_mid
            + g_on * (g_mid * t["se"]).sum(-1)
            + (pwl[:, 0] * e_mid + pwl[:, 1]) * e_out
        )
        post_pool = _head_cost(kind, self.head_pre, self.config["head_width"], self.num_classes)
        return t["fixed"] @ geo + per_block.sum() + head[0] * e_out[-1] + head[1] + float(post_pool)

    def expected_macs(self) -> Tensor:
        """Expected MACs per sample of the last forward's weights (see `expected_cost`); at
        one-hot weights exactly count_macs of the child."""
        return self.expected_cost("macs")

    def expected_params(self) -> Tensor:
        """Expected parameter count of the child of the last forward's weights (FBNetV2-P's
        cost, see `expected_cost`): differentiable in the width, expansion, kernel and SE logits;
        at one-hot weights exactly `sum(p.numel() for p in child(choices).parameters())`."""
        return self.expected_cost("params")

    # --- children -----------------------------------------------------------------------------
    def _child_specs(self, c: Mapping[str, Any]) -> list[BlockSpec]:
        specs = [] if self.first_spec is None else [self.first_spec]
        cin = self.base_width
        for j, b in enumerate(self.search_blocks):
            cout = self.stage_widths[b.stage][c["widths"][b.stage]]
            e = c["expansions"][j]
            se = b.se_mids[e] if self.se_options[c["se"][j]] else 0
            k = self.kernels[c["kernels"][j]]
            specs.append(BlockSpec(cin, cout, b.stride, b.mids[e], k, b.act, se, True, b.residual))
            cin = cout
        return specs

    def _net_kwargs(self, c: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        return {
            "blocks": self._child_specs(c),
            "stem_width": cfg["stem_width"],
            "stem_stride": cfg["stem_stride"],
            "head_width": cfg["head_width"],
            "head_pre": self.head_pre,
            "resolution": self.resolutions[c["resolution"]],
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "drop_rate": cfg["drop_rate"],
            "choices": c,
        }

    def standalone(self, choices: Mapping[str, Any]) -> FBNetV2Net:
        """A fresh, untrained FBNetV2Net of `choices` (the child's architecture)."""
        return FBNetV2Net(**self._net_kwargs(self._checked(choices)))

    @torch.no_grad()
    def child(self, choices: Mapping[str, Any]) -> FBNetV2Net:
        """The FBNetV2Net of `choices` carrying the supernet's weights and BN statistics, sliced
        to its widths: in eval mode it computes what the supernet fixed at `choices` does."""
        c = self._checked(choices)
        device = self.alpha_resolution.device
        with torch.device(device):
            net = FBNetV2Net(**self._net_kwargs(c))
        net.stem.load_state_dict(self.stem.state_dict())
        offset = 0
        if self.first is not None:
            net.blocks[0].load_state_dict(self.first.state_dict())
            offset = 1
        cin = self.base_width
        kmax = max(self.kernels)
        for j, src in enumerate(self._blocks()):
            dst = net.blocks[offset + j]
            spec = net.specs[offset + j]
            mid, cout, k = spec.mid, spec.cout, spec.kernel
            _copy_conv_bn(src.pw, dst.pw, (slice(0, mid), slice(0, cin)))
            lo = (kmax - k) // 2
            _copy_conv_bn(
                src.dw, dst.dw, (slice(0, mid), slice(None), slice(lo, lo + k), slice(lo, lo + k))
            )
            if dst.se is not None:
                s = spec.se
                dst.se.reduce.weight.copy_(src.se_reduce.weight[:s, :mid])
                dst.se.reduce.bias.copy_(src.se_reduce.bias[:s])
                dst.se.expand.weight.copy_(src.se_expand.weight[:mid, :s])
                dst.se.expand.bias.copy_(src.se_expand.bias[:mid])
            _copy_conv_bn(src.pwl, dst.pwl, (slice(0, cout), slice(0, mid)))
            cin = cout
        _copy_conv_bn(self.head_conv, net.head_conv, (slice(None), slice(0, cin)))
        net.head.load_state_dict(self.head.state_dict())
        return net.train(self.training)

    def _blocks(self) -> list[DMaskBlock]:
        return [block for stage in self.stages for block in stage]

    # --- description --------------------------------------------------------------------------
    def signature(self) -> dict[str, Any]:
        """A JSON-able description of the space and head, to check checkpoint compatibility."""
        c = self.config
        out: dict[str, Any] = {"variant": _VARIANTS[c["space"]]}
        for k, v in c.items():
            if k == "drop_rate":  # does not change the weights a checkpoint holds
                continue
            if k == "stage_widths":
                v = [list(s) for s in v]
            out[k] = list(v) if isinstance(v, tuple) else v
        return out

    def space_problem(self, input_size: Sequence[int]) -> str | None:
        """Why this space cannot run on (C, H, W) inputs (one line naming the fix), or None."""
        if len(input_size) != 3:
            return f"input size must be (C, H, W), got {tuple(input_size)}"
        ch, h, w = (int(v) for v in input_size)
        if ch != self.in_chans:
            return (
                f"the supernet takes {self.in_chans} input channels, the data has {ch}: "
                f"set in_chans={ch}"
            )
        too_big = [r for r in self.resolutions if r > min(h, w)]
        if too_big:
            return (
                f"resolution options {too_big} exceed the {h}x{w} input (the supernet only "
                f"subsamples): use resolutions <= {min(h, w)}"
            )
        return None


def _copy_conv_bn(src: ConvBNAct, dst: ConvBNAct, index: tuple[slice, ...]) -> None:
    """dst's conv weight = src's at `index`, dst's BN = src's first channels (state and stats)."""
    dst.conv.weight.copy_(src.conv.weight[index])
    n = dst.bn.num_features
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst.bn, name).copy_(getattr(src.bn, name)[:n])
    dst.bn.num_batches_tracked.copy_(src.bn.num_batches_tracked)


# --- timm registration --------------------------------------------------------------------------
def _published_cfg(resolution: int, resize: int) -> dict[str, Any]:
    """ImageNet config at the model's test resolution; crop = resolution / mobile-vision's
    short-side resize (model_info_fbnet_v2.json)."""
    cfg = imagenet_cfg("stem.conv", "head.fc", "bilinear")
    return {
        **cfg,
        "input_size": (3, resolution, resolution),
        "pool_size": (math.ceil(resolution / 32),) * 2,
        "crop_pct": resolution / resize,
    }


default_cfgs = generate_default_cfgs(
    {
        "fbnetv2_f_supernet": imagenet_cfg("stem.conv", "head.fc", "bilinear"),
        "cifar_fbnetv2_supernet": cifar_cfg((4, 4), "stem.conv"),
        "cifar_fbnetv2_supernet_tiny": cifar_cfg((4, 4), "stem.conv"),
        "cifar_fbnetv2_supernet_small": cifar_cfg((4, 4), "stem.conv"),
        "fbnetv2_f1": _published_cfg(128, 151),
        "fbnetv2_f2": _published_cfg(160, 179),
        "fbnetv2_f3": _published_cfg(192, 208),
        "fbnetv2_f4": _published_cfg(224, 251),
    }
)


@register_model
def fbnetv2_f_supernet(pretrained: bool = False, **kwargs: Any) -> FBNetV2Supernet:
    """The DMaskingNAS supernet over an FBNetV2-F-like ImageNet space."""
    return build_model_with_cfg(
        FBNetV2Supernet, "fbnetv2_f_supernet", pretrained, space="fbnetv2_f", **kwargs
    )


@register_model
def cifar_fbnetv2_supernet(pretrained: bool = False, **kwargs: Any) -> FBNetV2Supernet:
    """The DMaskingNAS supernet over dynlab's 32x32 space (stride-1 stem, 4x4 final map)."""
    return build_model_with_cfg(
        FBNetV2Supernet, "cifar_fbnetv2_supernet", pretrained, space="cifar", **kwargs
    )


# A small space of the CIFAR preset for tests and CPU runs on digits: 3 stages of two width
# options, expansions 1/3, resolutions 32/16, every stage at stride 2 (digits are 8x8 upsampled to
# 32x32, and depthwise convs are slow to train on CPU at 32x32). Overrides of the "cifar" space, so
# its checkpoints carry the same space signature as before it had a name of its own.
_CIFAR_TINY = {
    "stage_widths": ((8, 16), (16, 24), (24, 32)),
    "repeats": (1, 2, 1),
    "strides": (2, 2, 2),
    "expansions": (1, 3),
    "resolutions": (32, 16),
    "stem_width": 8,
    "head_width": 64,
}


@register_model
def cifar_fbnetv2_supernet_tiny(pretrained: bool = False, **kwargs: Any) -> FBNetV2Supernet:
    """The tiny DMaskingNAS space (`_CIFAR_TINY`) for 32x32 inputs on CPU."""
    return build_model_with_cfg(
        FBNetV2Supernet,
        "cifar_fbnetv2_supernet_tiny",
        pretrained,
        space="cifar",
        **{**_CIFAR_TINY, **kwargs},
    )


# A small space of the CIFAR preset for 32x32 grey images on CPU whose argmax networks span
# 2.0-30.7 M MACs at 1x32x32 (brackets ~10 M and ~20 M; 2.0 M supernet parameters): three
# stride-2 stages of four width options (FBNetV2's channel masking), 1/3/2 blocks, expansions
# 1/2/4, kernels 3/5, SE on/off, resolutions 32/16. Deviations (ours, for CPU time): expansions up
# to 4, not 6 (the widest depthwise conv dominates the supernet's time), and two resolutions (each
# option is one more body pass of the widest supernet).
_CIFAR_SMALL = {
    "stage_widths": ((24, 32, 40, 48), (48, 64, 80, 96), (96, 128, 160, 192)),
    "repeats": (1, 3, 2),
    "strides": (2, 2, 2),
    "expansions": (1, 2, 4),
    "resolutions": (32, 16),
    "head_width": 512,
}


@register_model
def cifar_fbnetv2_supernet_small(pretrained: bool = False, **kwargs: Any) -> FBNetV2Supernet:
    """The small DMaskingNAS space (`_CIFAR_SMALL`) for 32x32 inputs on CPU."""
    return build_model_with_cfg(
        FBNetV2Supernet,
        "cifar_fbnetv2_supernet_small",
        pretrained,
        space="cifar",
        **{**_CIFAR_SMALL, **kwargs},
    )


def _published(name: str, pretrained: bool, kwargs: dict[str, Any]) -> FBNetV2Net:
    return build_model_with_cfg(
        FBNetV2Net, name, pretrained, **{**_published_kwargs(name), **kwargs}
    )


@register_model
def fbnetv2_f1(pretrained: bool = False, **kwargs: Any) -> FBNetV2Net:
    """FBNetV2-F1 (mobile-vision; 128x128, 56.41 MFLOPs, 68.3% top-1)."""
    return _published("fbnetv2_f1", pretrained, kwargs)


@register_model
def fbnetv2_f2(pretrained: bool = False, **kwargs: Any) -> FBNetV2Net:
    """FBNetV2-F2 (F1's blocks at 160x160; 85.44 MFLOPs, 71.0%)."""
    return _published("fbnetv2_f2", pretrained, kwargs)


@register_model
def fbnetv2_f3(pretrained: bool = False, **kwargs: Any) -> FBNetV2Net:
    """FBNetV2-F3 (F1's blocks, 1984 head, 192x192; 121.82 MFLOPs, 73.0%)."""
    return _published("fbnetv2_f3", pretrained, kwargs)


@register_model
def fbnetv2_f4(pretrained: bool = False, **kwargs: Any) -> FBNetV2Net:
    """FBNetV2-F4 (224x224; 238.35 MFLOPs, 6.995 M params, 75.8% top-1)."""
    return _published("fbnetv2_f4", pretrained, kwargs)
