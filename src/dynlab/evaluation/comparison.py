"""Techniques compared on one chart: runs grouped over seeds, mean curves with their spread, and
each group measured against the static reference (the plain network the others try to beat).

Pure functions over results.json documents (`dynlab.results`); `dynlab-report` draws and tabulates
what they return. A group is every completed run with the same overrides but the seed; its
budgeted curve is the level-by-level mean of its runs' curves (every run of a sweep evaluates the
same budget levels), its spread the min and max over seeds. Where runs saved their per-test-image
outcomes (`dynlab.evaluation.outcomes`), each group is also set against the reference by a paired
bootstrap over the test images (`paired_comparison`), which tells a real gap from noise.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dynlab.evaluation.bootstrap import RESAMPLES, SEED, Interval, paired_bootstrap
from dynlab.evaluation.outcomes import Outcomes

# Budgeted accuracy is summarised at these fractions of the static reference's MACs.
REFERENCE_LEVELS = (0.25, 0.5)
STATIC_TECHNIQUE = "baseline"
# Whether a group matches the static reference (bootstrap) at no more than this fraction of its MACs.
MATCH_LEVEL = 0.5
MATCH_COLUMN = f"matches_static_at_{int(MATCH_LEVEL * 100)}pct_macs"


@dataclass
class Group:
    """Runs that differ only by their seed."""

    key: str  # the shared overrides, seed removed
    results: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""
    # Each run's per-test-image outcomes, in the order of `results`; None (or missing) for a run
    # without an outcomes file.
    outcomes: list[Outcomes | None] = field(default_factory=list)

    @property
    def technique(self) -> str:
        return str(self.results[0].get("technique"))

    @property
    def backbone(self) -> str:
        return str(self.results[0].get("backbone"))

    @property
    def plain_backbone(self) -> bool:
        """The backbone as registered, no options (not, e.g., one with RepVGG blocks): by the
        run's resolved config, or its overrides where no config was recorded."""
        config = self.results[0].get("config") or {}
        return (
            not (config.get("backbone") or {}).get("kwargs") and "backbone.kwargs" not in self.key
        )

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


def group_runs(
    runs: Sequence[tuple[list[str], dict[str, Any]]],
    outcomes: Sequence[Outcomes | None] | None = None,
) -> list[Group]:
    """Completed runs, given as (varying overrides, results), grouped over their seed in order
    of first appearance, each group labelled `technique · backbone` (plus what tells apart the
    groups that share those); `outcomes` gives each run's per-image outcomes, in the same order."""
    groups: dict[str, Group] = {}
    found = [None] * len(runs) if outcomes is None else list(outcomes)
    for (overrides, results), run_outcomes in zip(runs, found, strict=True):
        key = " ".join(o for o in overrides if not o.lstrip("+").startswith("seed="))
        group = groups.setdefault(key, Group(key))
        group.results.append(results)
        group.outcomes.append(run_outcomes)
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
    candidates = [g for g in static if g.plain_backbone] or static
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


@dataclass(frozen=True)
class PairedComparison:
    """A group against the static reference, test image by test image (`paired_comparison`)."""

    full: Interval  # entry − reference at the entry's full accuracy (its last exit)
    levels: list[tuple[float, Interval]]  # (average MACs, interval): budget levels, or its point
    pairing: str  # which runs were set against which

    def macs_to_match(self) -> float | None:
        """The fewest average MACs whose interval includes 0 or lies above it; None if none."""
        return min((macs for macs, interval in self.levels if interval.matches), default=None)


def run_seed(results: dict[str, Any]) -> int | None:
    """A run's seed: its provenance record's, else its `seed=` override; None if neither says."""
    seed = (results.get("provenance") or {}).get("seed")
    if seed is None:
        given = [o.lstrip("+").partition("=") for o in results.get("overrides") or []]
        seed = next((value for name, _, value in given if name == "seed"), None)
    try:
        return int(seed)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def paired_comparison(
    group: Group, reference: Group, resamples: int = RESAMPLES, seed: int = SEED
) -> PairedComparison | None:
    """`group` − `reference` in top-1 points by a paired bootstrap over the test images: every
    resample draws the same images for both (`dynlab.evaluation.bootstrap`).

    Seeds: when the two groups share seeds, only those runs count, seed s against seed s; when
    they share none, each group's runs are pooled. Either way an image's score is the fraction of
    the counted runs right on it. A dynamic group is compared at its full network and along its
    budget levels (MACs: each level's average, mean over its runs), a static one at its point.
    None when either group has no run with an outcomes file, or their test sets differ.
    """
    picked = _paired_outcomes(group, reference)
    if picked is None:
        return None
    entry, ref, pairing = picked
    if any(not np.array_equal(o.targets, ref[0].targets) for o in (*entry, *ref)):
        return None
    ref_correct = np.mean([o.full_correct() for o in ref], axis=0)
    full_correct = np.mean([o.full_correct() for o in entry], axis=0)
    curve = _mean_budgeted(entry) if group.dynamic else None
    if curve is None:
        (full,) = paired_bootstrap(full_correct, ref_correct, resamples, seed)
        macs = float(np.mean([o.exit_macs[-1] for o in entry]))
        return PairedComparison(full, [(macs, full)], pairing)
    correct, macs = curve
    full, *intervals = paired_bootstrap(
        np.vstack([full_correct[None], correct]), ref_correct, resamples, seed
    )
    return PairedComparison(full, list(zip(macs.tolist(), intervals, strict=True)), pairing)


def _paired_outcomes(
    group: Group, reference: Group
) -> tuple[list[Outcomes], list[Outcomes], str] | None:
    """The runs of each group that `paired_comparison` counts, and a note saying how they pair."""
    entry, ref = _seeded_outcomes(group), _seeded_outcomes(reference)
    if not entry or not ref:
        return None
    shared = {s for s, _ in entry if s is not None} & {s for s, _ in ref}
    if not shared:
        pooled = f"pooled: {len(entry)} run(s) vs {len(ref)}"
        return [o for _, o in entry], [o for _, o in ref], pooled
    paired = f"paired by seed: {', '.join(map(str, sorted(shared)))}"
    return [o for s, o in entry if s in shared], [o for s, o in ref if s in shared], paired


def _seeded_outcomes(group: Group) -> list[tuple[int | None, Outcomes]]:
    """(seed, outcomes) of the group's runs that have an outcomes file."""
    runs = zip(group.results, group.outcomes, strict=False)  # outcomes may be shorter: none
    return [(run_seed(results), found) for results, found in runs if found is not None]


def _mean_budgeted(runs: Sequence[Outcomes]) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-image scores [Q,N] and average MACs [Q] along the budget levels, mean over `runs`;
    None unless every run recorded the same levels."""
    qs = runs[0].qs
    if qs is None or not len(qs) or any(not np.array_equal(o.qs, qs) for o in runs):
        return None
    correct = np.mean([o.budgeted_correct() for o in runs], axis=0)
    macs = np.mean([o.budgeted_macs() for o in runs], axis=0)
    return correct, macs


def compare(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One row per group: size, cost and accuracy, and against the static reference the MACs
    needed to match its accuracy and the accuracy at 25 % / 50 % of its MACs; where outcomes
    files exist, the paired-bootstrap difference and the MACs to match it within its interval
    (`bootstrap_levels` holds the intervals along the budget levels)."""
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
        paired = (
            paired_comparison(group, reference)
            if reference is not None and group is not reference
            else None
        )
        row.update(_paired_cells(paired, ref_macs))
        rows.append(row)
    return rows


def _paired_cells(paired: PairedComparison | None, ref_macs: float | None) -> dict[str, Any]:
    """A row's bootstrap columns; all None without a paired comparison."""
    if paired is None:
        return {
            "top1_diff_vs_static": None,
            "top1_diff_vs_static_low": None,
            "top1_diff_vs_static_high": None,
            "macs_to_match_static_ci": None,
            MATCH_COLUMN: None,
            "bootstrap_pairing": None,
            "bootstrap_levels": [],
        }
    macs = paired.macs_to_match()
    return {
        "top1_diff_vs_static": paired.full.difference,
        "top1_diff_vs_static_low": paired.full.low,
        "top1_diff_vs_static_high": paired.full.high,
        "macs_to_match_static_ci": macs,
        MATCH_COLUMN: (
            None if ref_macs is None else macs is not None and macs <= MATCH_LEVEL * ref_macs
        ),
        "bootstrap_pairing": paired.pairing,
        "bootstrap_levels": [
            {
                "avg_macs": level_macs,
                "top1_diff": interval.difference,
                "low": interval.low,
                "high": interval.high,
                "matches": interval.matches,
            }
            for level_macs, interval in paired.levels
        ],
    }


def _short_overrides(key: str) -> str:
    """Overrides without their dotted prefixes and leading '+': `conv=acnet act=frelu`."""
    short = []
    for override in key.split():
        name, _, value = override.lstrip("+").partition("=")
        if name in ("technique", "backbone"):
            continue
        short.append(f"{name.rsplit('.', 1)[-1].rsplit('/', 1)[-1]}={value.rsplit('/', 1)[-1]}")
    return " ".join(short)


def _override_values(key: str) -> dict[str, str]:
    """A group key's overrides as {name: value}, leading '+' dropped."""
    return dict(o.lstrip("+").partition("=")[::2] for o in key.split())  # type: ignore[misc]


def counterparts(groups: Sequence[Group], override: str) -> list[tuple[Group, Group]]:
    """(group, counterpart) for every group of the counterpart's technique whose overrides differ
    from those of a group holding `override` in that override's value alone:
    `compare=metapruning_uniform` sets each MetaPruning run against the uniform baseline of the
    same MACs limit, and no other technique's entry. ValueError when no group holds it."""
    name, _, value = override.lstrip("+").partition("=")
    keyed = [(group, _override_values(group.key)) for group in groups]
    holders = [(g, o) for g, o in keyed if o.get(name) == value]
    if not holders:
        held = sorted({f"{name}={o[name]}" for _, o in keyed if name in o})
        raise ValueError(
            f"--versus {override}: no group of runs has it (their values: "
            f"{', '.join(held) or f'none set {name}'})"
        )
    pairs = []
    for counterpart, theirs in holders:
        rest = {k: v for k, v in theirs.items() if k != name}
        for group, ours in keyed:
            same_rest = {k: v for k, v in ours.items() if k != name} == rest
            if (
                ours.get(name, value) != value
                and same_rest
                and group.technique == counterpart.technique
            ):
                pairs.append((group, counterpart))
    return pairs


def versus(groups: Sequence[Group], override: str) -> list[dict[str, Any]]:
    """One row per pair of `counterparts`: each side's MACs and top-1, and the difference with its
    paired-bootstrap interval over the test images (None without outcomes files)."""
    rows = []
    for group, counterpart in counterparts(groups, override):
        paired = paired_comparison(group, counterpart)
        rows.append(
            {
                "entry": group.label,
                "against": counterpart.label,
                "seeds": group.seeds,
                "macs": group.macs,
                "against_macs": counterpart.macs,
                "top1": group.top1,
                "against_top1": counterpart.top1,
                "top1_diff": paired.full.difference if paired else None,
                "low": paired.full.low if paired else None,
                "high": paired.full.high if paired else None,
                "pairing": paired.pairing if paired else None,
            }
        )
    return rows
