"""FBNetV2's search spaces: the choices a supernet makes, the F and CIFAR presets, and
`space_config`, which checks a preset with its overrides."""

from __future__ import annotations

from typing import Any

from dynlab.backbones.fbnetv2.layers import ACTS

CHOICE_KEYS = ("resolution", "widths", "expansions", "kernels", "se")


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
VARIANTS = {"fbnetv2_f": "fbnetv2_f_supernet", "cifar": "cifar_fbnetv2_supernet"}


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
