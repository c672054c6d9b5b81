"""FBNetV2's search spaces: the choices a supernet makes, the F and CIFAR presets, and
`space_config`, which checks a preset with its overrides."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dynlab.backbones.fbnetv2.layers import ACTS, divisible_width

# One logit group per entry: "resolution" is one group; the others are lists of groups, "stem"
# and "head" of one (their widths), the rest one per searchable block.
CHOICE_KEYS = ("resolution", "stem", "widths", "ops", "expansions", "kernels", "se", "acts", "head")
BLOCK_KEYS = ("widths", "ops", "expansions", "kernels", "se", "acts")
OPS = ("ir", "skip")  # a block's op options; "skip" (mobile-vision's) only on stride-1 blocks

# The F space, widened so that the published FBNetV2-F1..F4 (mobile-vision
# fbnet_modeldef_cls_fbnetv2.py) are points of it: per-block widths within each stage's options,
# a skip option on stride-1 blocks, stem 8/16, head 1600/1984, the first block and stage searched
# over relu/hswish, hidden widths every multiple of 8 up to 6x the block's widest input. The stage
# ranges are inferred (an unofficial port we could not trace to a repository), widened where F1-F4 need it (last stage to
# 224, four blocks in the second stride-2 stage); the stage the models map onto each is written in
# `published.SLOTS`.
_F_SPACE: dict[str, Any] = {
    "stem_width": (8, 16),
    "stem_stride": 2,
    "first_width": 0,
    "stage_widths": (
        (8, 16),
        tuple(range(16, 29, 4)),
        tuple(range(16, 41, 8)),
        tuple(range(48, 97, 8)),
        tuple(range(72, 129, 8)),
        tuple(range(112, 225, 8)),
    ),
    "strides": (1, 2, 2, 2, 1, 2),
    "repeats": (1, 3, 4, 3, 4, 4),
    "acts": (("relu", "hswish"), ("relu", "hswish"), "relu", "hswish", "hswish", "hswish"),
    "expansions": (1.0, 2.0, 3.0, 4.0, 5.0, 6.0),
    "hidden_step": 8,
    "kernels": (3, 5),
    "se": (False, True),
    "skip": True,
    "resolutions": (224, 192, 160, 128),
    "head_width": (1600, 1984),
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
    "hidden_step": 0,
    "kernels": (3, 5),
    "se": (False, True),
    "skip": False,
    "resolutions": (32, 24, 16),
    "head_width": 1024,
}
SPACES = {"fbnetv2_f": _F_SPACE, "cifar": _CIFAR_SPACE}
VARIANTS = {"fbnetv2_f": "fbnetv2_f_supernet", "cifar": "cifar_fbnetv2_supernet"}


def _ints(name: str, values: Any, minimum: int = 1) -> tuple[int, ...]:
    """`values` (an int or a list) as distinct ints >= `minimum` (ValueError, one line)."""
    values = [values] if isinstance(values, int) and not isinstance(values, bool) else values
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of ints, got {values!r}") from None
    if not out or min(out) < minimum or any(isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be a non-empty list of ints >= {minimum}, got {values!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has duplicate options: {list(out)}")
    return out


def _acts(values: Any) -> tuple[tuple[str, ...], ...]:
    """Per stage, its activation options (a name or a list of names)."""
    out = tuple((a,) if isinstance(a, str) else tuple(str(v) for v in a) for a in values)
    for options in out:
        if not options or len(set(options)) != len(options) or set(options) - set(ACTS):
            raise ValueError(f"acts must be distinct names among {ACTS}, got {list(values)}")
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
        "acts": _acts(c["acts"]),
        "expansions": tuple(float(e) for e in c["expansions"]),
        "hidden_step": int(c["hidden_step"]),
        "kernels": _ints("kernels", c["kernels"]),
        "se": tuple(bool(s) for s in c["se"]),
        "skip": bool(c["skip"]),
        "resolutions": _ints("resolutions", c["resolutions"]),
        "stem_width": _ints("stem_width", c["stem_width"]),
        "stem_stride": int(c["stem_stride"]),
        "first_width": int(c["first_width"]),
        "head_width": _ints("head_width", c["head_width"]),
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
    e = out["expansions"]
    if not e or min(e) <= 0 or len(set(e)) != len(e):
        raise ValueError(f"expansions must be distinct ratios > 0, got {list(e)}")
    if out["hidden_step"] < 0:
        raise ValueError(f"hidden_step must be >= 0 (0: the expansions), got {out['hidden_step']}")
    if any(k % 2 == 0 for k in out["kernels"]):
        raise ValueError(f"kernels must be odd, got {list(out['kernels'])}")
    if not out["se"] or len(set(out["se"])) != len(out["se"]):
        raise ValueError(f"se options must be distinct booleans, got {list(out['se'])}")
    if out["first_width"] < 0:
        raise ValueError("first_width must be >= 0 (0: no fixed first block)")
    if out["first_width"] and len(out["stem_width"]) > 1:
        raise ValueError(
            f"a fixed first block (first_width={out['first_width']}) needs one stem width, got "
            f"{list(out['stem_width'])}: set first_width=0 or a single stem_width"
        )
    return out


def hidden_options(in_max: int, expansions: Sequence[float], step: int) -> tuple[int, ...]:
    """A block's hidden widths: each expansion of its widest input, rounded like mobile-vision's
    get_divisible_by (step 0), or every multiple of `step` up to the widest of those (the fine
    channel grid DMaskingNAS makes cheap; it holds F1-F4's hidden widths)."""
    widths = [divisible_width(in_max * e) for e in expansions]
    if step == 0:
        return tuple(widths)
    return tuple(range(step, max(widths) + 1, step))
