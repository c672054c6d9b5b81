"""The evolutionary architecture search of SPOS (Guo et al., ECCV 2020, Sec. 3.4 and Algorithm 1;
official megvii-model/SinglePathOneShot src/Search/search.py, `EvolutionSearcher`), which
MetaPruning's official search (liuzechun/MetaPruning) shares: every technique that searches a
flat gene vector by evolution under a MACs (and time) window uses this one.

A candidate is a flat tuple of ints (genes), gene i in range(gene_choices[i]) (or, in a space
restricted to some values per gene, such as AngleNAS's shrunk one, among `gene_values[i]`). The first generation
is `population` random legal candidates; after each generation is scored, the best `parents`
candidates seen so far breed the next one: `mutations` mutants, `crossovers` children, then random
candidates up to `population`. A candidate is legal when its MACs lie in the configured window and
it was never seen before; illegal ones are never scored.

Pure search logic on the search driver (`dynlab.search.driver`): the technique passes the MACs of a
candidate, how to score one and its settings (`EvolutionSettings`, which the techniques' typed
`evolution` config, `techniques/supernet_config.EvolutionConfig`, provides). Which candidates a
generation holds, and in what order, does not depend on any score of that generation, so the whole
list is drawn first (the driver's numpy Generator) and then scored where the run puts candidates
(this job's ranks or a Slurm job array); the driver's ledger makes a killed search resume with the
same candidates in the same order, score each index once overall and end as an uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from dynlab.data.sampling import rank_and_world_size
from dynlab.search.driver import NoCandidates, Search, SearchRNG, search_identity
from dynlab.search.supernet import PathScorer

__all__ = [
    "Evolution",
    "EvolutionSettings",
    "best_candidate",
    "pareto_front",
    "space_range_problem",
]

log = logging.getLogger(__name__)

# Evolution settings that change neither the candidates drawn nor their scores.
NOT_IDENTITY = ("generations", "candidates_on")

Genes = tuple[int, ...]
Record = dict[str, Any]


class EvolutionSettings(Protocol):
    """What the evolution reads of a technique's evolution config (a dataclass, so that its
    fields also make the search's identity)."""

    population: int
    generations: int
    parents: int
    mutations: int
    crossovers: int
    mutation_prob: float
    tries_factor: int
    min_mmacs: float | None
    max_mmacs: float | None
    min_latency_ms: float | None
    max_latency_ms: float | None


class Evolution(Search):
    """The official evolutionary search as a driver's search: a round is a generation.

    `evaluate(genes)` scores a candidate (it must return `top1`, the val top-1 in %, and may add
    fields); `macs_of(genes)` is its MACs; `draw_random(rng)` draws a random candidate, e.g.
    uniformly among those inside the MACs window (`sampling.WindowSampler`), None: every gene
    uniform. Either way a candidate outside the window is refused, as are mutants and crossover
    children outside it. A record is {"genes", "macs", "origin" ("random", "mutation" or
    "crossover"), "parents" (indices of the records it was bred from), "top1", what `evaluate`
    added, and the driver's "index", "round" (the generation), "rank" or "slurm_job"}.
    `name` is the technique's (the ledger's search name and the messages').
    """

    round_name = "generation"

    def __init__(
        self,
        gene_choices: Sequence[int],
        macs_of: Callable[[Genes], float],
        evaluate: Callable[[Genes], dict[str, Any]],
        cfg: EvolutionSettings,
        space: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        draw_random: Callable[[np.random.Generator], Genes] | None = None,
        latency_of: Callable[[Genes], float] | None = None,
        name: str = "evolution",
        gene_values: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.name = name
        self.choices = [int(c) for c in gene_choices]
        if not self.choices or min(self.choices) < 1:
            raise ValueError(
                f"{self.name} evolution: every gene needs >= 1 choice, got {self.choices}"
            )
        # The values each gene may take (all of range(choices) unless restricted).
        self.values = [tuple(range(c)) for c in self.choices]
        restricted: dict[str, Any] = {}
        if gene_values is not None:
            self.values = [tuple(int(v) for v in vs) for vs in gene_values]
            if len(self.values) != len(self.choices) or any(
                not vs or not all(0 <= v < c for v in vs)
                for vs, c in zip(self.values, self.choices, strict=False)
            ):
                raise ValueError(
                    f"{self.name} evolution: gene_values must give each of the {len(self.choices)} "
                    "genes one or more of its values"
                )
            restricted = {"gene_values": [list(vs) for vs in self.values]}
        self.macs_of, self.latency_of, self.draw_random = macs_of, latency_of, draw_random
        self.evaluate, self.cfg = evaluate, cfg
        space = {"gene_choices": self.choices, **restricted, **(space or {})}
        self._identity = search_identity(space, data or {}, cfg, *NOT_IDENTITY)
        self.history: list[dict[str, Any]] = []  # per generation: its size by origin and draws

    @property
    def rounds(self) -> int:
        # Exactly `generations` generations are scored and all count (the official loop scores a
        # further population after its last top-k update, which never enters the top-k).
        return self.cfg.generations

    def identity(self) -> dict[str, Any]:
        return self._identity

    def propose(self, rng: SearchRNG, records: Sequence[Record]) -> list[Record]:
        # Official `update_top_k`: the old top-k plus the new candidates, stably sorted by error,
        # cut to select_num; that is the best `parents` of all scored so far, earlier index first.
        parents = [(r["index"], tuple(r["genes"])) for r in _ranked(records)[: self.cfg.parents]]
        seen = {tuple(r["genes"]) for r in records}
        pending, stats = _breed(
            rng.numpy,
            self.values,
            self.macs_of,
            self.cfg,
            parents,
            seen,
            self.draw_random,
            self.latency_of,
        )
        if not pending:
            raise NoCandidates(
                f"no new legal candidate in {stats['draws']} draws ({stats['outside']} outside "
                f"the window {_window_text(self.cfg)}, {stats['seen']} seen before)"
            )
        self.history.append({"generation": len(self.history), **stats})
        return pending

    def score(self, candidate: Mapping[str, Any], index: int) -> dict[str, Any]:
        result = dict(self.evaluate(tuple(candidate["genes"])))
        if "top1" not in result:
            raise KeyError(f"{self.name} evolution: evaluate must return 'top1' (val top-1, %)")
        top1 = float(result["top1"])
        if not math.isfinite(top1):
            raise ValueError(
                f"{self.name} evolution: candidate {index} scored top1={result['top1']}"
            )
        return {**result, "top1": top1}

    def update(self, records: Sequence[Record]) -> None:
        if records and rank_and_world_size()[0] == 0:
            print(
                f"[dynlab] {self.name} evolution: generation {records[0]['round']}: "
                f"{len(records)} candidates, best val top-1 {max(r['top1'] for r in records):.2f}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = list(state["history"])

    def for_task(self) -> Evolution:
        """A Slurm array task's copy: a `PathScorer` detached from this process's device."""
        task = copy.copy(self)
        if isinstance(self.evaluate, PathScorer):
            task.evaluate = self.evaluate.detached()
        return task

    def gpus_per_task(self) -> int:
        device = getattr(self.evaluate, "device", "cpu")
        return int(torch.device(device).type == "cuda")

    def result(self, records: Sequence[Record]) -> dict[str, Any]:
        """The best candidate (highest val top-1) and the Pareto front of MACs and top-1."""
        best = best_candidate(records, self.name)
        latency = {"predicted_ms": best["latency_ms"]} if "latency_ms" in best else {}
        return {
            "architecture": list(best["genes"]),
            "mmacs": best["macs"] / 1e6,
            **latency,
            "supernet_val_top1": best["top1"],
            "pareto": [
                {"genes": list(r["genes"]), "mmacs": r["macs"] / 1e6, "top1": r["top1"]}
                for r in pareto_front(records)
            ],
        }


def best_candidate(records: Sequence[Mapping[str, Any]], name: str = "evolution") -> dict[str, Any]:
    """The record with the highest top-1 (the earlier index wins a tie)."""
    if not records:
        raise ValueError(f"{name} evolution: no candidate was scored")
    return dict(_ranked(records)[0])


def pareto_front(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The records no other dominates in (higher top-1, lower MACs), by increasing MACs.

    Records with the same MACs and top-1 as one on the front are on it too (none dominates another).
    """
    front: list[dict[str, Any]] = []
    best_below = -math.inf  # the best top-1 among strictly smaller MACs
    ordered = sorted(records, key=lambda r: (r["macs"], -r["top1"], r["index"]))
    start = 0
    while start < len(ordered):
        end = start
        while end < len(ordered) and ordered[end]["macs"] == ordered[start]["macs"]:
            end += 1
        top = ordered[start]["top1"]  # the best of this MACs value (sorted first)
        if top > best_below:
            front += [dict(r) for r in ordered[start:end] if r["top1"] == top]
            best_below = top
        start = end
    return front


def space_range_problem(
    minimum: float, maximum: float, cfg: EvolutionSettings, name: str
) -> str | None:
    """One line when the MACs window holds no architecture of a space whose MACs span
    [`minimum`, `maximum`] (MACs, not millions); None when the window meets that span. `name`:
    the technique's."""
    low, high = cfg.min_mmacs, cfg.max_mmacs
    span = f"the space spans {minimum / 1e6:g} M to {maximum / 1e6:g} M MACs"
    if low is not None and low * 1e6 > maximum:
        # Rounded down to a value that does admit the largest architecture.
        at_most = math.floor(maximum / 1e3) / 1e3
        return (
            f"{name} evolution: the MACs window {_window_text(cfg)} holds no architecture: {span}; "
            f"lower evolution.min_mmacs to at most {at_most:g}"
        )
    if high is not None and high * 1e6 < minimum:
        at_least = math.ceil(minimum / 1e3) / 1e3
        return (
            f"{name} evolution: the MACs window {_window_text(cfg)} holds no architecture: {span}; "
            f"raise evolution.max_mmacs to at least {at_least:g}"
        )
    return None


def _breed(
    rng: np.random.Generator,
    values: list[tuple[int, ...]],
    macs_of: Callable[[Genes], float],
    cfg: EvolutionSettings,
    parents: list[tuple[int, Genes]],
    seen: set[Genes],
    draw_random: Callable[[np.random.Generator], Genes] | None = None,
    latency_of: Callable[[Genes], float] | None = None,
) -> tuple[list[Record], dict[str, int]]:
    """The next generation's candidates (pending records without scores) and how many draws it
    took: mutants, then crossover children, then random ones (official `search`: `mutation +
    crossover`, then `get_random(population_num)`)."""
    high = np.asarray([len(vs) for vs in values])

    def pick(indices: np.ndarray) -> Genes:
        return tuple(vs[int(k)] for vs, k in zip(values, indices, strict=True))

    low_macs = None if cfg.min_mmacs is None else cfg.min_mmacs * 1e6
    high_macs = None if cfg.max_mmacs is None else cfg.max_mmacs * 1e6
    members: list[Record] = []
    stats = {"draws": 0, "outside": 0, "seen": 0, "mutation": 0, "crossover": 0, "random": 0}

    def fill(wanted: int, origin: str, draw: Callable[[], tuple[Genes, list[int]]]) -> None:
        """Add up to `wanted` legal candidates, giving up after tries_factor x wanted draws
        (official get_mutation/get_crossover: max_iters = num * 10)."""
        added = 0
        for _ in range(cfg.tries_factor * wanted):
            if added == wanted:
                return
            genes, bred_from = draw()
            stats["draws"] += 1
            # Official `is_legal`: a candidate seen before (scored, or already drawn) is refused,
            # and one over the FLOPs limit is refused before it is scored.
            if genes in seen:
                stats["seen"] += 1
                continue
            macs = float(macs_of(genes))
            if not _inside(macs, low_macs, high_macs):
                stats["outside"] += 1
                continue
            member = {"genes": list(genes), "macs": macs, "origin": origin, "parents": bred_from}
            if latency_of is not None:  # the time window, on the latency table's prediction
                member["latency_ms"] = float(latency_of(genes))
                if not _inside(member["latency_ms"], cfg.min_latency_ms, cfg.max_latency_ms):
                    stats["outside"] += 1
                    continue
            seen.add(genes)
            members.append(member)
            stats[origin] += 1
            added += 1

    def uniform() -> tuple[Genes, list[int]]:
        # Official get_random_cand: every gene uniform over its choices (then refused outside the
        # window); `draw_random` draws from that same distribution restricted to the window.
        if draw_random is not None:
            return tuple(int(g) for g in draw_random(rng)), []
        return pick(rng.integers(0, high)), []

    def mutant() -> tuple[Genes, list[int]]:
        # Official get_mutation: a random parent of the top-k, each gene resampled uniformly (it
        # may draw its old value) with probability m_prob.
        index, genes = parents[int(rng.integers(len(parents)))]
        resample = rng.random(len(values)) < cfg.mutation_prob
        fresh = pick(rng.integers(0, high))
        return tuple(int(g) for g in np.where(resample, fresh, genes)), [index]

    def child() -> tuple[Genes, list[int]]:
        # Official get_crossover: two random parents of the top-k (possibly the same one), each
        # gene taken from either with probability 1/2.
        (i, a), (j, b) = (parents[int(k)] for k in rng.integers(len(parents), size=2))
        take_a = rng.random(len(values)) < 0.5
        return tuple(int(g) for g in np.where(take_a, a, b)), [i, j]

    if parents:
        fill(cfg.mutations, "mutation", mutant)
        fill(cfg.crossovers, "crossover", child)
    # The official get_random loops until the population is full, forever in a space with too
    # few legal candidates; here it too gives up after tries_factor x (the number wanted) draws.
    fill(cfg.population - len(members), "random", uniform)
    return members, stats


def _inside(value: float, low: float | None, high: float | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


def _ranked(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Records by decreasing top-1, the earlier index first among equals."""
    return sorted(records, key=lambda r: (-r["top1"], r["index"]))


def _window(cfg: EvolutionSettings) -> list[float | None]:
    """The MACs window in millions, [min_mmacs, max_mmacs] (None: no bound)."""
    return [cfg.min_mmacs, cfg.max_mmacs]


def _window_text(cfg: EvolutionSettings) -> str:
    """The window as the config spells it, e.g. [min_mmacs=none, max_mmacs=330] (and its
    latency bounds when it has any)."""
    low, high = (("none" if b is None else f"{b:g}") for b in _window(cfg))
    text = f"min_mmacs={low}, max_mmacs={high}"
    for name in ("min_latency_ms", "max_latency_ms"):
        if getattr(cfg, name) is not None:
            text += f", {name}={getattr(cfg, name):g}"
    return f"[{text}]"
