"""SPOS's evolutionary search on synthetic spaces and scores (no networks): it improves, keeps every
candidate legal and new, composes generations as the official code, resumes exactly, spreads over
two gloo ranks, and its front, best, range check and plot; the MACs window on measured spaces:
random draws uniform inside it, every candidate kept inside it, empty windows refused."""

from __future__ import annotations

import itertools
import json
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from dynlab.backbones import create_backbone
from dynlab.backbones.spos_shufflenetv2 import MacsTable
from dynlab.errors import SearchMismatch
from dynlab.search import Ledger
from dynlab.search.driver import SearchDriver
from dynlab.search.evolution import (
    Evolution,
    best_candidate,
    pareto_front,
    space_range_problem,
)
from dynlab.search.evolution_report import plot_pareto
from dynlab.techniques.spos.sampling import WindowSampler
from dynlab.techniques.supernet_config import EvolutionConfig

GENES, CHOICES = 8, 4
_tables = np.random.default_rng(0)
# Additive made-up tables: choice c of gene i costs MACS[i, c] (M) and scores SCORE[i, c] (%).
MACS = _tables.uniform(1.0, 5.0, size=(GENES, CHOICES)).round(3)
SCORE = _tables.uniform(0.0, 10.0, size=(GENES, CHOICES)).round(3)
WINDOW = {"min_mmacs": 18.0, "max_mmacs": 24.0}


def macs_of(genes: tuple[int, ...]) -> float:
    return float(sum(MACS[i, g] for i, g in enumerate(genes))) * 1e6


def top1_of(genes: tuple[int, ...]) -> dict[str, Any]:
    return {"top1": float(sum(SCORE[i, g] for i, g in enumerate(genes)))}


def stop_reason(phase_dir: Path) -> str | None:
    """Why the search saved in `phase_dir` stopped before its last generation (its ledger)."""
    ledger = Ledger(phase_dir)
    assert ledger.load()
    return ledger.state["stopped"]


def run_evolution(
    choices: list[int],
    macs: Any,
    evaluate: Any,
    cfg: EvolutionConfig,
    phase_dir: Path,
    seed: int,
    draw_random: Any = None,
    search: type[Evolution] = Evolution,
) -> list[dict[str, Any]]:
    """The evolution run (or resumed) by the search driver; its records."""
    evolution = search(choices, macs, evaluate, cfg, draw_random=draw_random)
    return SearchDriver(evolution, phase_dir, seed).run().records


def small(**changes: Any) -> EvolutionConfig:
    """12 a generation, 6 generations, 4 parents, in the MACs window."""
    fields = {"population": 12, "generations": 6, "parents": 4, "mutations": 4, "crossovers": 4}
    return EvolutionConfig(**{**fields, **WINDOW, **changes})


def by_generation(records: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["round"], []).append(r)
    return out


def test_evolution_improves_on_its_first_generation_with_only_legal_new_candidates(
    tmp_path: Path,
) -> None:
    seen: list[tuple[int, list[dict[str, Any]]]] = []

    class Watched(Evolution):
        def update(self, records: Any) -> None:
            seen.append((records[0]["round"], list(records)))

    records = run_evolution(
        [CHOICES] * GENES, macs_of, top1_of, small(), tmp_path, seed=0, search=Watched
    )
    generations = by_generation(records)
    assert [g for g, _ in seen] == list(range(6)) and all(len(rs) == 12 for _, rs in seen)
    assert [r for _, rs in seen for r in rs] == records
    assert [r["index"] for r in records] == list(range(72))
    genes = [tuple(r["genes"]) for r in records]
    assert len(set(genes)) == len(genes)  # never scored twice
    for r in records:
        assert r["macs"] == macs_of(tuple(r["genes"])) and 18e6 <= r["macs"] <= 24e6
        assert r["top1"] == top1_of(tuple(r["genes"]))["top1"]
    # The whole space's optimum under the window (brute force over 4^8).
    space = np.array(list(itertools.product(range(CHOICES), repeat=GENES)))
    cost = MACS[np.arange(GENES), space].sum(1)
    legal = (cost >= 18.0) & (cost <= 24.0)
    optimum = SCORE[np.arange(GENES), space].sum(1)[legal].max()
    first, last = generations[0], generations[5]
    best = best_candidate(records)
    assert best["top1"] > max(r["top1"] for r in first) + 1.0
    assert best["top1"] <= optimum + 1e-9 and best["top1"] > optimum - 3.0
    # Selection pressure: a late generation is better on average than random candidates.
    assert np.mean([r["top1"] for r in last]) > np.mean([r["top1"] for r in first]) + 3.0
    saved = Ledger(tmp_path)
    assert saved.load() and saved.records == records and saved.state["round"] == 6
    assert stop_reason(tmp_path) is None


def test_generations_are_mutants_then_children_then_random_as_the_official_search(
    tmp_path: Path,
) -> None:
    cfg = EvolutionConfig(
        population=20, generations=4, parents=4, mutations=6, crossovers=5, mutation_prob=0.25
    )
    choices = [8] * 12  # 8^12 candidates: every draw is new
    records = run_evolution(choices, lambda g: 1e6 * sum(g), top1_of_long, cfg, tmp_path, seed=3)
    generations = by_generation(records)
    assert Counter(r["origin"] for r in generations[0]) == {"random": 20}
    changed, genes, from_first = 0, 0, 0
    for g in (1, 2, 3):
        earlier = [r for r in records if r["round"] < g]
        top = sorted(earlier, key=lambda r: (-r["top1"], r["index"]))[:4]
        parents = {r["index"]: r["genes"] for r in top}
        origins = [r["origin"] for r in generations[g]]
        assert origins == ["mutation"] * 6 + ["crossover"] * 5 + ["random"] * 9
        for r in generations[g]:
            assert all(p in parents for p in r["parents"])
            if r["origin"] == "mutation":
                (p,) = r["parents"]
                diff = sum(a != b for a, b in zip(r["genes"], parents[p], strict=True))
                changed, genes = changed + diff, genes + len(choices)
            elif r["origin"] == "crossover":
                a, b = (parents[p] for p in r["parents"])
                assert all(x in (y, z) for x, y, z in zip(r["genes"], a, b, strict=True))
                from_first += sum(x == y for x, y in zip(r["genes"], a, strict=True))
            else:
                assert r["parents"] == []
    # A gene changes when resampled (p=0.25) to another of its 8 values: 0.25 * 7/8 = 0.22.
    assert 0.12 < changed / genes < 0.33
    assert 0 < from_first < 15 * 12  # both parents contribute


def top1_of_long(genes: tuple[int, ...]) -> dict[str, Any]:
    return {"top1": float(sum((i % 3 + 1) * g for i, g in enumerate(genes))), "extra": len(genes)}


class Killed(Exception):
    pass


@pytest.mark.parametrize("kill_at", [5, 12, 13, 30, "generation 2"])
def test_a_killed_search_resumes_exactly(tmp_path: Path, kill_at: int | str) -> None:
    cfg, choices = small(generations=4), [CHOICES] * GENES
    whole = run_evolution(choices, macs_of, top1_of, cfg, tmp_path / "whole", seed=1)
    calls: list[tuple[int, ...]] = []

    def dies(genes: tuple[int, ...]) -> dict[str, Any]:
        if len(calls) + 1 == kill_at:
            raise Killed
        calls.append(genes)
        return top1_of(genes)

    class DiesAfter(Evolution):
        def update(self, records: Any) -> None:
            if f"generation {records[0]['round']}" == kill_at:
                raise Killed

    with pytest.raises(Killed):
        run_evolution(choices, macs_of, dies, cfg, tmp_path / "killed", 1, search=DiesAfter)
    kill_at = -1
    resumed = run_evolution(choices, macs_of, dies, cfg, tmp_path / "killed", seed=1)
    assert resumed == whole
    assert len(calls) == len(whole) == len({tuple(r["genes"]) for r in whole})
    assert calls == [tuple(r["genes"]) for r in whole]  # each index scored once, in order


def test_an_exhausted_space_or_an_empty_window_stops_early_and_says_why(tmp_path: Path) -> None:
    cfg = EvolutionConfig(population=3, generations=5, parents=2, mutations=1, crossovers=1)
    records = run_evolution([2, 2], lambda g: 0.0, top1_of, cfg, tmp_path / "tiny", seed=0)
    assert sorted(tuple(r["genes"]) for r in records) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {r["round"] for r in records} == {0, 1}
    reason = stop_reason(tmp_path / "tiny")
    assert reason is not None and reason.startswith("generation 2: no new legal candidate")
    empty = EvolutionConfig(population=4, generations=3, mutations=0, crossovers=0, max_mmacs=1)
    evaluate = lambda g: pytest.fail("an illegal candidate was scored")  # noqa: E731
    with pytest.raises(RuntimeError, match="evolution search scored no candidate: generation 0"):
        run_evolution([3] * 4, macs_of, evaluate, empty, tmp_path / "empty", seed=0)
    reason = stop_reason(tmp_path / "empty")
    assert reason == (
        "generation 0: no new legal candidate in 40 draws (40 outside the window "
        "[min_mmacs=none, max_mmacs=1], 0 seen before)"
    )
    with pytest.raises(SearchMismatch, match=r"another search \(seed: 0 there, 1 here\)"):
        run_evolution([3] * 4, macs_of, evaluate, empty, tmp_path / "empty", seed=1)


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        calls: list[list[int]] = []

        def evaluate(genes: tuple[int, ...]) -> dict[str, Any]:
            calls.append(list(genes))
            return {**top1_of(genes), "scored_on": rank}

        records = run_evolution([CHOICES] * GENES, macs_of, evaluate, small(), Path(out), seed=2)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"records": records, "calls": calls}))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_share_the_work_and_end_with_the_single_process_ledger(
    tmp_path: Path,
) -> None:
    single = run_evolution([CHOICES] * GENES, macs_of, top1_of, small(), tmp_path / "one", seed=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    mp.start_processes(
        _rank_main, args=(2, port, str(out)), nprocs=2, join=True, start_method="fork"
    )
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["records"] == ranks[1]["records"]  # every rank holds the same ledger
    saved = json.loads((out / "candidates.json").read_text())
    assert saved == ranks[0]["records"]
    strip = ("rank", "scored_on")
    assert [{k: v for k, v in r.items() if k not in strip} for r in saved] == [
        {k: v for k, v in r.items() if k != "rank"} for r in single
    ]
    assert [r["rank"] for r in saved] == [r["scored_on"] for r in saved] == [0, 1] * 36
    for rank in range(2):  # rank r scored exactly the records that say so, each once
        assert ranks[rank]["calls"] == [r["genes"] for r in saved if r["rank"] == rank]


def test_front_best_and_the_range_check() -> None:
    def rec(index: int, macs_m: float, top1: float) -> dict[str, Any]:
        return {"index": index, "macs": macs_m * 1e6, "top1": top1}

    records = [
        rec(0, 10, 50.0),
        rec(1, 20, 60.0),
        rec(2, 15, 55.0),
        rec(3, 25, 58.0),  # dominated by 1
        rec(4, 12, 50.0),  # dominated by 0
        rec(5, 30, 70.0),
        rec(6, 20, 60.0),  # ties 1: neither dominates the other
        rec(7, 30, 70.0),
        rec(8, 40, 69.0),  # dominated by 5
    ]
    assert [r["index"] for r in pareto_front(records)] == [0, 2, 1, 6, 5, 7]
    assert best_candidate(records)["index"] == 5
    assert best_candidate([rec(3, 1, 1.0), rec(1, 2, 1.0)])["index"] == 1
    with pytest.raises(ValueError):
        best_candidate([])

    low, high = 12.3456e6, 98.7654e6
    assert space_range_problem(low, high, EvolutionConfig(), "spos") is None
    assert (
        space_range_problem(low, high, EvolutionConfig(min_mmacs=50, max_mmacs=60), "spos") is None
    )
    assert (
        space_range_problem(low, high, EvolutionConfig(min_mmacs=98.7, max_mmacs=500), "spos")
        is None
    )
    above = space_range_problem(low, high, EvolutionConfig(min_mmacs=100, max_mmacs=200), "spos")
    assert above == (
        "spos evolution: the MACs window [min_mmacs=100, max_mmacs=200] holds no architecture: "
        "the space spans 12.3456 M to 98.7654 M MACs; lower evolution.min_mmacs to at most 98.765"
    )
    below = space_range_problem(low, high, EvolutionConfig(max_mmacs=12.3), "spos")
    assert below is not None and below.endswith("raise evolution.max_mmacs to at least 12.346")
    assert "[min_mmacs=none, max_mmacs=12.3]" in below
    # The bound it suggests does admit the space's extreme.
    assert space_range_problem(low, high, EvolutionConfig(max_mmacs=12.346), "spos") is None
    assert space_range_problem(low, high, EvolutionConfig(min_mmacs=98.765), "spos") is None


def test_plot_pareto_writes_a_png(tmp_path: Path) -> None:
    records = run_evolution(
        [CHOICES] * GENES, macs_of, top1_of, small(generations=2), tmp_path, seed=0
    )
    path = tmp_path / "plots" / "pareto.png"
    plot_pareto(records, pareto_front(records), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# --- the MACs window on measured spaces ---------------------------------------------------------
def _table(name: str, size: tuple[int, int, int]) -> MacsTable:
    return MacsTable.measure(create_backbone(name, num_classes=10, in_chans=size[0]), size)


def test_window_draws_are_uniform_over_exactly_the_candidates_inside() -> None:
    """On the tiny space (4^5 candidates, enumerated) the draws hit every candidate inside the
    window, none outside, about equally often: the official rejection loop's distribution."""
    table = _table("cifar_spos_supernet_tiny", (3, 32, 32))
    macs = {g: table.macs(g) for g in itertools.product(range(4), repeat=5)}
    low, high = np.quantile(list(macs.values()), [0.2, 0.3])
    inside = {g for g, m in macs.items() if low <= m <= high}
    sampler = WindowSampler(table, low, high)
    rng = np.random.default_rng(0)
    counts = Counter(sampler.draw(rng) for _ in range(40 * len(inside)))
    assert set(counts) == inside
    # Chi-square with len(inside) - 1 degrees of freedom (about 100): far below 200 if uniform.
    chi2 = sum((n - 40) ** 2 / 40 for n in counts.values())
    assert chi2 < 200
    assert sampler.share == pytest.approx(len(inside) / len(macs), rel=0.1)


def test_evolution_in_a_narrow_window_of_the_small_space_scores_only_candidates_inside(
    tmp_path: Path,
) -> None:
    """18-20 M MACs of cifar_spos_supernet_small at 1x32x32 (about 10 % of its candidates, a 20 M
    target): random ones are drawn inside it, mutants and children outside it are refused."""
    table = _table("cifar_spos_supernet_small", (1, 32, 32))
    cfg = EvolutionConfig(
        population=16,
        generations=4,
        parents=4,
        mutations=6,
        crossovers=6,
        min_mmacs=18.0,
        max_mmacs=20.0,
    )
    sampler = WindowSampler(table, 18e6, 20e6)
    assert 0.05 < sampler.share < 0.15
    records = run_evolution(
        table.space.gene_choices(),
        table.macs,
        lambda g: {"top1": float(sum(g))},
        cfg,
        tmp_path,
        seed=0,
        draw_random=sampler.draw,
    )
    assert len(records) == 16 * 4 and stop_reason(tmp_path) is None
    assert {r["origin"] for r in records} == {"random", "mutation", "crossover"}
    for r in records:
        assert 18e6 <= r["macs"] == table.macs(tuple(r["genes"])) <= 20e6
    # Every random draw was inside the window: only bred candidates were refused.
    history = Ledger(tmp_path)
    assert history.load()
    assert history.state["search"]["history"][0]["outside"] == 0


def test_window_emptiness_nearest_and_bounds() -> None:
    table = _table("cifar_spos_supernet_tiny", (3, 32, 32))
    values = sorted({table.macs(g) for g in itertools.product(range(4), repeat=5)})
    a, b = max(itertools.pairwise(values), key=lambda p: p[1] - p[0])
    gap = WindowSampler(table, a + (b - a) / 3, b - (b - a) / 3)
    assert gap.empty()
    below, above = gap.nearest()
    assert below == pytest.approx(a, abs=5 * gap.step) and above == pytest.approx(
        b, abs=5 * gap.step
    )
    assert not WindowSampler(table, a, a + (b - a) / 3).empty()
    assert WindowSampler(table, None, None).share == 1.0
    with pytest.raises(ValueError, match="window is empty: min_mmacs=20.0 must be below"):
        EvolutionConfig(min_mmacs=20.0, max_mmacs=20.0)
    with pytest.raises(ValueError, match="window is empty"):
        EvolutionConfig(min_mmacs=21.0, max_mmacs=20.0)
    with pytest.raises(ValueError, match="min_mmacs must be > 0"):
        EvolutionConfig(min_mmacs=-1.0)
