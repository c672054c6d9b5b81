"""The published searched models FBNetV2-F1..F4 as mobile-vision defines them
(mobile_cv/arch/fbnet_v2/fbnet_modeldef_cls_fbnetv2.py, MODEL_ARCH_FBNETV2_PAPER), expanded as its
builder does, and their choices in the F space (`published_choices`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dynlab.backbones.fbnetv2.layers import BlockSpec, divisible_width, se_width

if TYPE_CHECKING:
    from dynlab.backbones.fbnetv2.supernet import FBNetV2Supernet

# Rows (op, out width, stride, repeats, expansion, kernel, SE, activation): `ir_k5_sehsig_hs` is
# ("ir", c, s, n, e, 5, True, "hswish"); `skip` rows carry only op, width, stride, repeats. The
# first row is mobile-vision's stage 1 (after the `conv_k3_hs` stem), the last the block before
# the `ir_pool_hs` head. F1, F2 and F3 share their blocks (checked against the file).
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
# How many of each model's blocks fall in each stage of the F space (space._F_SPACE); a stage's
# other blocks are identity skips. mobile-vision's stage 4 (one stride-2 group) spans the space's
# stages 3 (stride 2) and 4 (stride 1).
SLOTS: dict[str, tuple[int, ...]] = {
    "fbnetv2_f1": (1, 2, 2, 3, 3, 4),
    "fbnetv2_f2": (1, 2, 2, 3, 3, 4),
    "fbnetv2_f3": (1, 2, 2, 3, 3, 4),
    "fbnetv2_f4": (1, 3, 4, 3, 4, 4),
}


def expand_rows(
    stem_width: int, rows: Sequence[Sequence[Any]], divisor: int = 8
) -> list[BlockSpec]:
    """mobile-vision's builder on `rows`: repeats at stride 1, mid = get_divisible_by(cin * e),
    no pw when cin == mid, SE width se_width(mid), residual when cin == cout at stride 1
    (irf_block.py IRFBlock, basic_blocks.py build_residual_connect)."""
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
    """FBNetV2Net's arguments for the published model `name` (bilinear input resize)."""
    stem, rows, head_width, resolution = PUBLISHED[name]
    return {
        "blocks": expand_rows(stem, rows),
        "stem_width": stem,
        "stem_stride": 2,
        "head_width": head_width,
        "resolution": resolution,
        "zero_last_bn_gamma": True,  # IRF_CFG
        "resize": "bilinear",
    }


def _index(options: Sequence[Any], value: Any, what: str) -> int:
    if value not in options:
        raise ValueError(f"{what} {value!r} is not among the space's options {list(options)}")
    return list(options).index(value)


def published_choices(net: FBNetV2Supernet, name: str) -> dict[str, Any]:
    """The choices of the published model `name` in `net`'s space (an F space): its blocks laid
    on the stages by `SLOTS`, the rest identity skips (ValueError when a value is not an option)."""
    stem, _, head_width, resolution = PUBLISHED[name]
    specs = published_kwargs(name)["blocks"]
    slots = SLOTS[name]
    if len(slots) != len(net.stage_widths) or sum(slots) != len(specs):
        raise ValueError(f"{name}'s slots {slots} do not fit the space's stages")
    out: dict[str, Any] = {k: [] for k in ("widths", "ops", "expansions", "kernels", "se", "acts")}
    queue, width = list(specs), stem
    for i, b in enumerate(net.search_blocks):
        placed = sum(1 for c in net.search_blocks[:i] if c.stage == b.stage)  # before b
        where = f"{name} block {i}"
        if placed < slots[b.stage]:
            spec = queue.pop(0)
            if spec.stride != b.stride:
                raise ValueError(f"{where}: stride {spec.stride}, the space's {b.stride}")
            width = spec.cout
            op, mid, k, se, act = spec.op, spec.mid, spec.kernel, spec.se > 0, spec.act
        else:  # an identity skip at the current width
            op, mid, k, se, act = "skip", b.mids[0], net.kernels[0], net.se_options[0], b.acts[0]
        out["widths"].append(_index(b.outs, width, f"{where}: width"))
        out["ops"].append(_index(b.ops, op, f"{where}: op"))
        out["expansions"].append(_index(b.mids, mid if op == "ir" else b.mids[0], f"{where}: mid"))
        out["kernels"].append(_index(net.kernels, k if op == "ir" else net.kernels[0], where))
        out["se"].append(_index(net.se_options, se if op == "ir" else net.se_options[0], where))
        out["acts"].append(_index(b.acts, act if op == "ir" else b.acts[0], f"{where}: act"))
    return {
        "resolution": _index(net.resolutions, resolution, "resolution"),
        "stem": [_index(net.stem_widths, stem, "stem width")],
        **out,
        "head": [_index(net.head_widths, head_width, "head width")],
    }
