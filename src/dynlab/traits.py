"""What validation knows of each technique without importing it (no torch, no timm): the
schedules it has and the backbones it needs, so a wrong pairing is refused in about a second.
Each technique's module checks the same on the built model; a test keeps the backbone lists equal
to what dynlab's registered backbones are."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneKind:
    """Backbones a technique needs beyond any classifier: `what` they are, and the registered
    ones that are (a test keeps `names` in step with dynlab.backbones)."""

    what: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class TechniqueTraits:
    """What validation knows of a technique without importing it (torch, timm): the modes it has
    a schedule for (`train`: dynlab-train, `search`: dynlab-search) and the backbones it runs on
    (None: any classifier). Its module checks the same on the built model."""

    modes: tuple[str, ...] = ("train",)
    backbones: BackboneKind | None = None


SPARSE_BACKBONES = BackboneKind(
    "a network of LGC/SFR layers (CondenseNetV2, SFR-ShuffleNetV2)",
    (
        *(f"cifar_condensenetv2_{depth}" for depth in ("110", "146", "tiny")),
        "cifar_sfr_shufflenetv2",
        *(f"condensenetv2_{variant}" for variant in "abc"),
        "sfr_shufflenetv2_x1_0",
    ),
)
SPOS_SUPERNETS = BackboneKind(
    "an SPOS one-shot supernet",
    (
        "cifar_spos_supernet",
        "cifar_spos_supernet_small",
        "cifar_spos_supernet_tiny",
        "spos_supernet",
    ),
)
FBNETV2_SUPERNETS = BackboneKind(
    "a DMaskingNAS supernet",
    (
        "cifar_fbnetv2_supernet",
        "cifar_fbnetv2_supernet_small",
        "cifar_fbnetv2_supernet_tiny",
        "fbnetv2_f_supernet",
    ),
)
# By technique name (`technique.name`); a technique not listed trains any backbone.
TECHNIQUE_TRAITS: dict[str, TechniqueTraits] = {
    "s2dnas": TechniqueTraits(modes=("train", "search")),
    "spos": TechniqueTraits(modes=("train", "search"), backbones=SPOS_SUPERNETS),
    "fbnetv2": TechniqueTraits(modes=("train", "search"), backbones=FBNETV2_SUPERNETS),
    "sfr": TechniqueTraits(backbones=SPARSE_BACKBONES),
}


def technique_traits(technique: str) -> TechniqueTraits:
    """The traits of `technique` (a `technique.name`)."""
    return TECHNIQUE_TRAITS.get(technique, TechniqueTraits())


def no_schedule(technique: str, mode: str) -> str | None:
    """Why `technique` cannot run the `mode` schedule, or None when it has one."""
    if mode in technique_traits(technique).modes:
        return None
    others = sorted(name for name, t in TECHNIQUE_TRAITS.items() if mode in t.modes)
    return (
        f"technique={technique} has no {mode} schedule, it only trains: run it with dynlab-train, "
        f"or pick a technique with a {mode}: technique={'|'.join(others)}"
    )


def backbone_needed(technique: str, backbone: str) -> str:
    """What `technique` needs as its backbone, and which backbones are that (not `backbone`)."""
    kind = technique_traits(technique).backbones
    assert kind is not None, f"{technique} declares no backbones it needs"
    return (
        f"technique={technique} needs {kind.what} as its backbone and {backbone} is none: set "
        f"backbone.name to {', '.join(kind.names[:-1])} or {kind.names[-1]}"
    )
