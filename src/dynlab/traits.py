"""What validation knows of each technique without importing it (no torch, no timm): the
schedules it has and the capability it needs of its backbone, so a wrong pairing is refused before
training. Which backbones have that capability, they declare themselves (`register_backbone` in
`dynlab.backbones`); each technique's module checks the same on the built model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from dynlab.capabilities import Capability, declared_backbones


@dataclass(frozen=True)
class TechniqueTraits:
    """What validation knows of a technique without importing it (torch, timm): the modes it has
    a schedule for (`train`: dynlab-train, `search`: dynlab-search, `rank`: dynlab-rank) and the capability its
    backbone must declare (None: any classifier). Its module checks the same on the built model."""

    modes: tuple[str, ...] = ("train",)
    needs: Capability | None = None


# By technique name (`technique.name`); a technique not listed trains any backbone.
TECHNIQUE_TRAITS: dict[str, TechniqueTraits] = {
    "s2dnas": TechniqueTraits(modes=("train", "search")),
    "spos": TechniqueTraits(modes=("train", "search", "rank"), needs=Capability.spos_supernet),
    "anglenas": TechniqueTraits(modes=("train", "search", "rank"), needs=Capability.spos_supernet),
    "fbnetv2": TechniqueTraits(modes=("train", "search"), needs=Capability.dmasking_supernet),
    "metapruning": TechniqueTraits(modes=("train", "search", "rank"), needs=Capability.pruning_net),
    "sfr": TechniqueTraits(needs=Capability.sparse_layers),
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


def backbone_needed(
    technique: str, backbone: str, declared: Mapping[str, frozenset[Capability]] | None = None
) -> str:
    """What `technique` needs of its backbone, and the backbones `declared` to have it (default:
    dynlab's own, read torch-free from their source by `declared_backbones`)."""
    needs = technique_traits(technique).needs
    assert needs is not None, f"{technique} needs no capability of its backbone"
    declared = declared_backbones() if declared is None else declared
    *others, last = sorted(n for n, caps in declared.items() if needs in caps)
    choice = f"{', '.join(others)} or {last}" if others else last
    return (
        f"technique={technique} needs {needs.value} as its backbone and {backbone} is none: set "
        f"backbone.name to {choice}"
    )
