"""dynlab-rank: the agreement statistics against scipy and by hand, the architectures a ranking
takes, and a digits ranking of the SPOS supernet end to end: its controls, its seed ceiling, a
second ranking of the same architectures reusing the trained-alone scores, exact resume after a
kill, a PruningNet ranked the same way, and bad input refused before anything runs."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from dynlab.evaluation.ranking import agreement, top_k_overlap
from dynlab.preemption import Preempted
from dynlab.runner import run_job
from dynlab.search import RESULT
from dynlab.search import ranking as ranking_module
from dynlab.search import supernet as scoring
from dynlab.search.driver import NoCandidates, SearchRNG
from dynlab.search.ledger import RECORDS
from dynlab.search.ranking import RankingStudy
from dynlab.techniques.supernet_config import RankingConfig
from dynlab.validation import ConfigError, build_run, validate_config

from .conftest import compose_in

RANK = [
    "technique=spos",
    "backbone=cifar_spos_supernet_tiny",
    "dataset=digits",
    "dataset.batch_size=64",
    "technique.optim.lr=0.1",
    "technique.phases.supernet.epochs=4",
    "technique.evolution.recalibration_batches=4",
    "technique.evolution.val_images=200",
    "technique.ranking.architectures=5",
    "technique.ranking.epochs=3",
    "technique.ranking.bootstrap=200",
    "technique.ranking.top_k=3",
    "trainer.enable_progress_bar=false",
    "evaluation.budgeted=false",
    "logger=csv",
]


@pytest.fixture(scope="module")
def ranked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("rank") / "spos"
    cache = run.parent / "alone"
    run_job(compose_in([*RANK, f"technique.ranking.alone_cache={cache}"], "rank", run))
    return run


def _result(run: Path) -> dict[str, Any]:
    return json.loads((run / "checkpoints" / "rank" / RESULT).read_text())


# --- the statistics ---------------------------------------------------------------------------------
def test_agreement_is_scipys_tau_and_rho_with_intervals_around_them() -> None:
    rng = np.random.default_rng(0)
    truth = rng.normal(size=30)
    proxy = truth + rng.normal(scale=0.8, size=30)
    found = agreement(proxy, truth, 5, 500, np.random.default_rng(1))
    assert found.tau == pytest.approx(stats.kendalltau(proxy, truth).statistic)
    assert found.rho == pytest.approx(stats.spearmanr(proxy, truth).statistic)
    assert found.tau_low < found.tau < found.tau_high and found.rho_low < found.rho < found.rho_high
    assert 0.2 < found.tau < 0.8  # a noisy proxy: neither random nor exact
    best = np.argsort(-truth)[:5]
    assert found.top_k_tau == pytest.approx(stats.kendalltau(proxy[best], truth[best]).statistic)
    exact = agreement(truth, truth, 5, 100, np.random.default_rng(1))
    reverse = agreement(-truth, truth, 5, 100, np.random.default_rng(1))
    assert (exact.tau, exact.top_k_overlap, reverse.tau, reverse.top_k_overlap) == (1, 1, -1, 0)


def test_top_k_overlap_counts_the_shared_best() -> None:
    assert top_k_overlap([5, 4, 3, 2, 1], [1, 5, 4, 3, 2], 2) == 0.5
    assert top_k_overlap([1, 2, 3], [1, 2, 3], 3) == 1.0


def test_a_given_list_is_ranked_where_it_lies_in_the_space_and_too_few_are_refused() -> None:
    cfg = RankingConfig(architectures=3)

    def study(given: list[list[int]]) -> RankingStudy:
        return RankingStudy(
            lambda rng: (0,), lambda g: g[0] != 9, None, _Key(), len, len, cfg, {}, {}, given
        )

    given = [[1, 1], [9, 0], [2, 2], [1, 1], [3, 3], [4, 4]]
    proposed = study(given).propose(SearchRNG.from_seed(0), [])
    assert [c["genes"] for c in proposed] == [[1, 1], [2, 2], [3, 3]]  # no duplicate, none of 9
    with pytest.raises(NoCandidates, match="2 distinct architectures"):
        study([[9, 9], [1, 1], [2, 2]]).propose(SearchRNG.from_seed(0), [])


class _Key:
    key: dict[str, Any] = {}


# --- a ranking on digits ----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_digits_ranking_scores_every_architecture_and_its_controls(ranked: Path) -> None:
    result = _result(ranked)
    archs = result["architectures"]
    assert len(archs) == 5 and len({tuple(a["genes"]) for a in archs}) == 5
    assert all(len(a["alone_top1"]) == 2 for a in archs)
    # Trained alone for 3 epochs, every architecture learns digits (chance: 10 %).
    assert min(min(a["alone_top1"]) for a in archs) > 50.0
    truth = [float(np.mean(a["alone_top1"])) for a in archs]
    for name, key in (("inherited", "inherited_top1"), ("params", "params"), ("macs", "macs")):
        expected = stats.kendalltau([a[key] for a in archs], truth).statistic
        assert result["rows"][name]["tau"] == pytest.approx(expected)
    ceiling = stats.kendalltau(*([a["alone_top1"][s] for a in archs] for s in (0, 1))).statistic
    assert result["seeds"][0]["tau"] == pytest.approx(ceiling)
    assert set(result["rows"]) == {"inherited", "params", "macs", "random"}
    table = (ranked / "ranking.md").read_text()
    assert "| inherited |" in table and "seed 0 vs seed 1 (ceiling)" in table
    # The supernet's pick of the sample is the one with the best inherited score.
    best = max(archs, key=lambda a: a["inherited_top1"])
    assert result["architecture"] == best["genes"]


@pytest.mark.slow
def test_the_same_architectures_ranked_again_reuse_their_trained_alone_scores(
    compose_cfg, ranked: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cached architecture was trained again")

    monkeypatch.setattr(ranking_module, "train_candidate", no_training)
    first = _result(ranked)
    overrides = [
        *RANK,
        f"ckpt_path={ranked / 'checkpoints' / 'supernet' / 'final.ckpt'}",
        "phase=rank",
        f"technique.ranking.architectures_file={ranked / 'checkpoints' / 'rank' / RESULT}",
        f"technique.ranking.alone_cache={ranked.parent / 'alone'}",
    ]
    run_job(compose_cfg(overrides, config_name="rank", run_dir=tmp_path / "again"))
    again = _result(tmp_path / "again")
    assert again["architectures"] == first["architectures"]


@pytest.mark.slow
def test_a_ranking_killed_between_architectures_resumes_and_ends_the_same(
    compose_cfg, ranked: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The trained-alone scores come from the fixture's cache: the resume is the driver's.
    overrides = [
        *RANK,
        f"ckpt_path={ranked / 'checkpoints' / 'supernet' / 'final.ckpt'}",
        "phase=rank",
        f"technique.ranking.alone_cache={ranked.parent / 'alone'}",
    ]
    recalibrate, calls = scoring.recalibrate_bn, {"n": 0}

    def signalled_at_the_third(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # Slurm's warning: stop at the next boundary
        return recalibrate(*args, **kwargs)

    monkeypatch.setattr(scoring, "recalibrate_bn", signalled_at_the_third)
    killed = tmp_path / "killed"
    with pytest.raises(Preempted):
        run_job(compose_cfg(overrides, config_name="rank", run_dir=killed))
    partial = json.loads((killed / "checkpoints" / "rank" / RECORDS).read_text())
    assert [r["index"] for r in partial] == [0, 1, 2]
    monkeypatch.setattr(scoring, "recalibrate_bn", recalibrate)
    run_job(compose_cfg(overrides, config_name="rank", run_dir=killed))
    assert _result(killed)["architectures"] == _result(ranked)["architectures"]


@pytest.mark.slow
def test_a_pruningnet_is_ranked_the_same_way(compose_cfg, tmp_path: Path) -> None:
    overrides = [
        "technique=metapruning",
        "backbone=cifar_pruningnet_resnet8",
        "dataset=digits",
        "dataset.batch_size=64",
        "trainer.max_epochs=2",
        "technique.evolution.recalibration_batches=4",
        "technique.evolution.recalibration_batch_size=64",
        "technique.evolution.val_images=200",
        "technique.ranking.architectures=4",
        "technique.ranking.epochs=1",
        "technique.ranking.bootstrap=100",
        "trainer.enable_progress_bar=false",
        "evaluation.budgeted=false",
        "logger=csv",
    ]
    cfg = compose_cfg(overrides, config_name="rank", run_dir=tmp_path / "mp")
    run_job(cfg)
    archs = _result(tmp_path / "mp")["architectures"]
    assert len({tuple(a["genes"]) for a in archs}) == 4
    assert all(len(a["alone_top1"]) == 2 for a in archs)
    # The controls are the pruned networks' own costs.
    _, module = build_run(cfg)
    for a in archs:
        pruned = module._supernet.standalone(tuple(a["genes"]))
        assert a["params"] == sum(p.numel() for p in pruned.parameters())
        assert a["macs"] == module.macs_of(a["genes"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["technique.architecture=[0,0,0,0,0]"], "nothing to rank; retrain it with dynlab-train"),
        (["technique.ranking.architectures_file=/nope.json"], "not a ranking's search_result"),
        (["technique.ranking.architectures=2"], "architectures must be >= 3"),
        (["dataset.val_size=0"], "the ranking scores architectures on it"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(
    compose_cfg, overrides: list[str], message: str
) -> None:
    cfg = compose_cfg([*RANK, *overrides], config_name="rank")
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)
        build_run(cfg)


def test_a_technique_without_a_supernet_has_no_ranking(compose_cfg) -> None:
    cfg = compose_cfg(["technique=s2dnas", "dataset=digits"], config_name="rank")
    with pytest.raises(ConfigError, match="technique=s2dnas has no rank schedule, it only trains"):
        validate_config(cfg)
