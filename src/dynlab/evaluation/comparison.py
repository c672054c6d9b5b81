"""Techniques compared on one chart: runs grouped over seeds, mean curves with their spread, and
each group measured against the static reference (the plain network the others try to beat).

Pure functions over results.json documents (`dynlab.results`); `dynlab-report` draws and tabulates
what they return. A group is every completed run with the same overrides but the seed; its
budgeted curve is the level-by-level mean of its runs' curves (every run of a sweep evaluates the
same budget levels), its spread the min and max over seeds.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Budgeted accuracy is summarised at these fractions of the static reference's MACs.
REFERENCE_LEVELS = (0.25, 0.5)
STATIC_TECHNIQUE = "baseline"


@dataclass
class Group:
    """Runs that differ only by their seed."""

    key: str  # the shared overrides, seed removed
    results: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""

    @property
    def technique(self) -> str:
        return str(self.results[0].get("technique"))

    @property
    def backbone(self) -> str:
        return str(self.results[0].get("backbone"))

    @property
    def seeds(self) -> int:
        return len(self.results)

    def mean(self, values: Sequence[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.fmean(known) if known else None

    @property
    def top1(self) -> float | None:
        return self.mean([(r.get("metrics") or {}).get("test/top1") for r in self.results])

    @property
    def top1_spread(self) -> float | None:
        values = [(r.get("metrics") or {}).get("test/top1") for r in self.results]
        known = [v for v in values if v is not None]
        return statistics.stdev(known) if len(known) > 1 else None

    @property
    def macs(self) -> float | None:
        """MACs of the full network (its last exit), mean over seeds."""
        return self.mean([(r.get("exit_macs") or [None])[-1] for r in self.results])

    @property
    def params(self) -> float | None:
        return self.mean([r.get("params") for r in self.results])

    @property
    def train_seconds(self) -> float | None:
        """Wall-clock seconds of all training phases (results' `phase_seconds`), mean over seeds."""
        return self.mean(
            [
                sum(r["phase_seconds"].values()) if r.get("phase_seconds") else None
                for r in self.results
            ]
        )

    @property
    def dynamic(self) -> bool:
        """More than one exit: a curve on the chart (a static network is a point)."""
        return len(self.results[0].get("exit_macs") or []) > 1

    def curve(self) -> list[dict[str, float]] | None:
        """The mean budgeted curve, each level with the min and max accuracy over seeds; None for
        a static network (one exit: a point) or runs without one."""
        curves = [(r.get("budgeted") or {}).get("curve") for r in self.results]
        if not self.dynamic or not all(curves):
            return None
        if len({len(c) for c in curves}) != 1:  # runs evaluated other levels: not comparable
            curves = curves[:1]
        ordered = [sorted(c, key=lambda p: p.get("q", p["avg_macs"])) for c in curves]
        return [
            {
                "avg_macs": statistics.fmean(p["avg_macs"] for p in level),
                "accuracy": statistics.fmean(p["accuracy"] for p in level),
                "low": min(p["accuracy"] for p in level),
                "high": max(p["accuracy"] for p in level),
            }
            for level in zip(*ordered, strict=True)
        ]


def group_runs(runs: Sequence[tuple[list[str], dict[str, Any]]]) -> list[Group]:
    """Completed runs, given as (varying overrides, results), grouped over their seed in order
    of first appearance, each group labelled `technique · backbone` (plus what tells apart the
    groups that share those)."""
    groups: dict[str, Group] = {}
    for overrides, results in runs:
        key = " ".join(o for o in overrides if not o.lstrip("+").startswith("seed="))
        groups.setdefault(key, Group(key)).results.append(results)
    by_base: dict[str, list[Group]] = {}
    for group in groups.values():
        by_base.setdefault(f"{group.technique} · {group.backbone}", []).append(group)
    for base, members in by_base.items():
        shared = set.intersection(*(set(g.key.split()) for g in members))
        for group in members:
            own = " ".join(o for o in group.key.split() if o not in shared)
            extra = _short_overrides(own) if len(members) > 1 else ""
            group.label = f"{base} · {extra}" if extra else base
    return list(groups.values())


def static_reference(groups: Sequence[Group]) -> Group | None:
    """The plain network the others are measured against: among the `baseline` groups (those
    setting no backbone options first), the one whose backbone most other groups use (the network
    the techniques transform), the first on a tie; None without a baseline."""
    static = [g for g in groups if g.technique == STATIC_TECHNIQUE]
    candidates = [g for g in static if "backbone.kwargs" not in g.key] or static
    if not candidates:
        return None
    uses = Counter(g.backbone for g in groups)
    return max(candidates, key=lambda g: uses[g.backbone])  # max keeps the first on a tie


def macs_to_reach(group: Group, accuracy: float) -> float | None:
    """The fewest average MACs at which the group reaches `accuracy` (its mean curve, or its
    point); None when it never does."""
    curve = group.curve()
    if curve:
        fitting = [p["avg_macs"] for p in curve if p["accuracy"] >= accuracy]
        return min(fitting, default=None)
    top1 = group.top1
    return group.macs if top1 is not None and top1 >= accuracy else None


def accuracy_within(group: Group, budget: float) -> float | None:
    """The group's best accuracy at no more than `budget` average MACs; None if nothing fits."""
    curve = group.curve()
    if curve:
        return max((p["accuracy"] for p in curve if p["avg_macs"] <= budget), default=None)
    macs = group.macs
    return group.top1 if macs is not None and macs <= budget else None


def compare(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One row per group: size, cost and accuracy, and against the static reference the MACs
    needed to match its accuracy and the accuracy at 25 % / 50 % of its MACs."""
    reference = static_reference(groups)
    ref_top1 = reference.top1 if reference else None
    ref_macs = reference.macs if reference else None
    rows = []
    for group in groups:
        row: dict[str, Any] = {
            "technique": group.label,
            "chart": "curve" if group.curve() else "point",
            "seeds": group.seeds,
            "params": group.params,
            "macs": group.macs,
            "top1": group.top1,
            "top1_spread": group.top1_spread,
            "macs_to_match_static": (
                macs_to_reach(group, ref_top1) if ref_top1 is not None else None
            ),
            "train_minutes": None if group.train_seconds is None else group.train_seconds / 60,
            "static_reference": group is reference,
        }
        for level in REFERENCE_LEVELS:
            budget = None if ref_macs is None else level * ref_macs
            column = f"top1_at_{int(level * 100)}pct_static_macs"
            row[column] = accuracy_within(group, budget) if budget is not None else None
        rows.append(row)
    return rows


def _short_overrides(key: str) -> str:
    """Overrides without their dotted prefixes and leading '+': `conv=acnet act=frelu`."""
    short = []
    for override in key.split():
        name, _, value = override.lstrip("+").partition("=")
        if name in ("technique", "backbone"):
            continue
        short.append(f"{name.rsplit('.', 1)[-1].rsplit('/', 1)[-1]}={value.rsplit('/', 1)[-1]}")
    return " ".join(short)
