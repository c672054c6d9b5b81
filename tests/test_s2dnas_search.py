"""The S2DNAS search: a tiny end-to-end search on digits, its records, kill-and-resume, DDP ranks."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dynlab.config import BackboneConfig
from dynlab.data.base import DataInfo
from dynlab.data.digits import DigitsDataModule
from dynlab.data.synthetic import SyntheticDataModule
from dynlab.errors import SearchMismatch
from dynlab.preemption import Preempted
from dynlab.results import read_results
from dynlab.runner import run_job
from dynlab.search.driver import SearchDriver
from dynlab.search.ledger import RECORDS as CANDIDATES
from dynlab.search.ledger import STATE as SEARCH_STATE
from dynlab.techniques.base import Phase, PhaseContext, PhaseKind
from dynlab.techniques.s2dnas import search as search_module
from dynlab.techniques.s2dnas.config import (
    ExitRule,
    RewardForm,
    S2DNASConfig,
    S2DNASSearchConfig,
)
from dynlab.techniques.s2dnas.controller import Controller, Reinforce
from dynlab.techniques.s2dnas.module import S2DNASModule
from dynlab.techniques.s2dnas.reward import (
    dynamic_score,
    exit_thresholds,
    inference_record,
    reward,
    score_at,
)
from dynlab.techniques.s2dnas.search import ControllerSearch
from dynlab.techniques.s2dnas.settings import S2DSettings

from .conftest import S2D_SEARCH, technique_config

SEARCH_PHASES = ("search", "retrain_1")
DIGITS = DataInfo("digits", 10, (3, 32, 32))
TINY_SEARCH = S2DNASSearchConfig(
    iterations=2, candidates_per_iteration=2, candidate_batches=1, top_k=2
)


def search_in(
    run_dir: Path, val_size: int = 48, groups: int = 4
) -> tuple[S2DNASModule, list[dict[str, Any]]]:
    """Run the search phase of a digits S2DNAS module in `run_dir`; the module and its records."""
    datamodule = DigitsDataModule(val_size=val_size, batch_size=16, eval_batch_size=48)
    config = technique_config(S2DNASConfig, num_stages=2, groups=groups, search=TINY_SEARCH)
    module = S2DNASModule(config, BackboneConfig(name="cifar_resnet20"), datamodule.info)
    phase_dir = run_dir / "search"
    module.start_phase(Phase("search", PhaseKind.custom))
    module.run_custom_phase(
        Phase("search", PhaseKind.custom), PhaseContext(run_dir, phase_dir, datamodule, None)
    )
    return module, json.loads((phase_dir / CANDIDATES).read_text())


def test_dynamic_score_and_rewards_follow_the_exit_rule() -> None:
    # 4 samples, 2 exits, 2 classes: samples 0 and 1 are confident at exit 1 (one of them wrongly).
    first = torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.6, 0.4], [0.55, 0.45]])
    last = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    probs, targets = torch.stack([first, last]), torch.tensor([0, 0, 1, 1])
    cfg = S2DNASSearchConfig(threshold=0.9, cost_weight=0.5)
    score = dynamic_score(probs, targets, exit_macs=[10.0, 30.0], static_macs=40.0, cfg=cfg)
    assert score.exit_fractions == [0.5, 0.5]
    assert score.accuracy == 75.0 and score.avg_macs == 20.0 and score.macs_ratio == 0.5
    assert reward(score, cfg) == pytest.approx(0.75 - 0.5 * 0.5)
    product = S2DNASSearchConfig(
        reward=RewardForm.product, target_macs_ratio=0.25, product_exponent=-0.5
    )
    assert reward(score, product) == pytest.approx(0.75 * 2**-0.5)
    for q, fractions in [(1e-6, [0.75, 0.25]), (1e6, [0.0, 1.0])]:  # p_k ~ q^k, floored quotas
        budget = S2DNASSearchConfig(exit_rule=ExitRule.budget, budget_q=q)
        assert dynamic_score(probs, targets, [10.0, 30.0], 40.0, budget).exit_fractions == fractions


def three_exit_probs() -> tuple[torch.Tensor, torch.Tensor]:
    """60 samples, 3 exits, 3 classes (target 0). A (40): confident enough (0.62) and right at
    exit 1. B (20): unsure at exit 1 (0.4), confidently wrong at exit 2 (0.9), right at exit 3."""
    a = torch.tensor([[0.62, 0.38, 0.0], [0.62, 0.38, 0.0], [0.9, 0.1, 0.0]])
    b = torch.tensor([[0.3, 0.4, 0.3], [0.1, 0.9, 0.0], [0.8, 0.2, 0.0]])
    probs = torch.cat([a[:, None].expand(3, 40, 3), b[:, None].expand(3, 20, 3)], dim=1)
    return probs.contiguous(), torch.zeros(60, dtype=torch.long)


MACS3, STATIC3 = [10.0, 20.0, 40.0], 40.0


def test_per_stage_thresholds_change_which_exit_samples_take() -> None:
    probs, targets = three_exit_probs()
    shared = dynamic_score(probs, targets, MACS3, STATIC3, S2DNASSearchConfig(threshold=0.5))
    assert shared.exit_fractions == pytest.approx([2 / 3, 1 / 3, 0.0])  # B leaves wrong at exit 2
    assert shared.thresholds == [0.5, 0.5, None] and shared.accuracy == pytest.approx(200 / 3)
    per_stage = dynamic_score(
        probs, targets, MACS3, STATIC3, S2DNASSearchConfig(threshold=[0.5, 0.95])
    )
    assert per_stage.exit_fractions == pytest.approx([2 / 3, 0.0, 1 / 3])  # B goes on to exit 3
    assert per_stage.thresholds == [0.5, 0.95, None] and per_stage.accuracy == 100.0


def test_a_threshold_list_of_the_wrong_length_is_refused_before_training() -> None:
    probs, targets = three_exit_probs()
    two = S2DNASSearchConfig(threshold=[0.5, 0.95])
    config = technique_config(S2DNASConfig, num_stages=4, search=two)
    with pytest.raises(ValueError, match=r"has 2 values for 4 stages: give one per early exit"):
        S2DNASModule(config, BackboneConfig(name="cifar_resnet20"), DIGITS)
    with pytest.raises(ValueError, match=r"search.threshold has 1 values for 3 stages"):
        dynamic_score(probs, targets, MACS3, STATIC3, S2DNASSearchConfig(threshold=[0.9]))
    with pytest.raises(ValueError, match=r"search.threshold must be in \(0, 1\]"):
        S2DNASSearchConfig(threshold=[0.9, 1.5])
    assert S2DNASSearchConfig(threshold=[1, 0.5]).threshold == [1.0, 0.5]  # ints are floats


def test_the_reward_counts_the_macs_of_the_exit_each_sample_takes() -> None:
    probs, targets = three_exit_probs()
    cfg = S2DNASSearchConfig(threshold=[0.5, 0.95], cost_weight=0.5)
    score = dynamic_score(probs, targets, MACS3, STATIC3, cfg)
    # 40 samples leave at exit 1 (10 MACs), 20 at exit 3 (40): 20 on average, not the last 40
    assert score.avg_macs == pytest.approx((40 * 10 + 20 * 40) / 60) == 20.0
    assert score.macs_ratio == pytest.approx(0.5)
    assert reward(score, cfg) == pytest.approx(1.0 - 0.5 * 20 / 40)


def test_searched_thresholds_reach_more_than_any_shared_one_on_the_grid() -> None:
    probs, targets = three_exit_probs()
    cfg = S2DNASSearchConfig(exit_rule=ExitRule.searched, cost_weight=0.5)
    shared = {
        t: reward(
            dynamic_score(probs, targets, MACS3, STATIC3, S2DNASSearchConfig(threshold=t)), cfg
        )
        for t in cfg.threshold_grid
    }
    assert max(shared.values()) == pytest.approx(0.5)  # no shared value serves both exits
    searched = dynamic_score(probs, targets, MACS3, STATIC3, cfg)
    # from the best shared value (0.5, the lowest of the ties), exit 2 alone moves up to 0.95
    assert searched.thresholds == [0.5, 0.95, None]
    assert reward(searched, cfg) == pytest.approx(0.75)


@pytest.mark.parametrize("form", [RewardForm.difference, RewardForm.product])
def test_searched_thresholds_are_deterministic_grid_values_never_below_the_best_shared(
    form: RewardForm,
) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = (
        torch.randn(4, 300, 5, generator=generator)
        * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None, None]
    )
    probs, targets = logits.softmax(dim=2), torch.randint(0, 5, (300,), generator=generator)
    targets[:150] = logits[-1, :150].argmax(dim=1)  # the last exits know half of the samples
    macs, static = [10.0, 20.0, 30.0, 40.0], 40.0
    cfg = S2DNASSearchConfig(exit_rule=ExitRule.searched, reward=form, cost_weight=0.2)
    best_shared = max(
        reward(score_at(probs, targets, torch.tensor([t] * 3 + [-math.inf]), macs, static), cfg)
        for t in cfg.threshold_grid
    )
    searched = dynamic_score(probs, targets, macs, static, cfg)
    assert reward(searched, cfg) >= best_shared
    assert all(t in cfg.threshold_grid for t in searched.thresholds[:-1])
    assert dynamic_score(probs, targets, macs, static, cfg) == searched


def test_inference_record_sets_thresholds_on_val_and_reports_test() -> None:
    val_probs, val_targets = three_exit_probs()
    # on test, exit 1 is sure of itself: calibrating there would give other thresholds
    test_probs = val_probs.clone()
    test_probs[0, :] = torch.tensor([0.97, 0.03, 0.0])
    test = (test_probs, val_targets.clone())
    cfg = S2DNASSearchConfig(exit_rule=ExitRule.budget, budget_q=1.0)
    on_val = exit_thresholds(val_probs, val_targets, MACS3, STATIC3, cfg)
    assert not torch.equal(on_val, exit_thresholds(*test, MACS3, STATIC3, cfg))
    record = inference_record((val_probs, val_targets), test, MACS3, STATIC3, cfg)
    assert record["rule"] == "budget" and record["thresholds"] == on_val[:-1].tolist()
    expected = score_at(*test, on_val, MACS3, STATIC3)
    assert record["top1"] == expected.accuracy and record["avg_macs"] == expected.avg_macs
    assert record["exit_fractions"] == expected.exit_fractions
    assert record["val"]["reward"] == reward(
        score_at(val_probs, val_targets, on_val, MACS3, STATIC3), cfg
    )


def test_the_test_loop_reports_early_exit_at_the_val_thresholds() -> None:
    datamodule = SyntheticDataModule(
        num_train=32, num_test=40, val_size=24, batch_size=16, eval_batch_size=64
    )
    cfg = S2DNASSearchConfig(exit_rule=ExitRule.searched, cost_weight=0.1)
    config = technique_config(S2DNASConfig, num_stages=3, groups=4, search=cfg)
    module = S2DNASModule(config, BackboneConfig(name="cifar_resnet20"), datamodule.info)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.test(module, datamodule=datamodule, verbose=False)
    record = module.deployed_cost(datamodule.info.input_size)["s2dnas_thresholds"]
    deployed = module.deploy()
    exit_macs = deployed.exit_macs(datamodule.info.input_size)
    assert record["rule"] == "searched" and len(record["thresholds"]) == 2
    assert all(t in cfg.threshold_grid for t in record["thresholds"])
    assert len(record["exit_fractions"]) == 3 and 0 <= record["top1"] <= 100
    assert record["avg_macs"] == pytest.approx(
        sum(f * m for f, m in zip(record["exit_fractions"], exit_macs, strict=True))
    )
    # the same searched thresholds as the val score the reward uses
    datamodule.setup("fit")
    val_score = module._val_score(datamodule)
    assert val_score["thresholds"][:2] == pytest.approx(record["thresholds"])
    assert val_score["reward"] == pytest.approx(record["val"]["reward"])


def test_tiny_search_on_digits_records_every_candidate_and_grows_the_schedule(
    tmp_path: Path,
) -> None:
    module, records = search_in(tmp_path)
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert [r["round"] for r in records] == [0, 0, 1, 1]
    for r in records:
        S2DSettings.from_dict(r["settings"]).validate(num_stages=2, num_layer_groups=3, groups=4)
        assert 0 <= r["accuracy"] <= 100 and 0 < r["macs_ratio"] < 1
        assert r["reward"] == pytest.approx(
            r["accuracy"] / 100 - TINY_SEARCH.cost_weight * r["macs_ratio"]
        )
        assert sum(r["exit_fractions"]) == pytest.approx(1.0)
    assert module.top_k[0]["reward"] == max(r["reward"] for r in records)
    assert [p.name for p in module.phases("search")] == [
        "search",
        "retrain_1",
        "retrain_2",
        "select",
    ]
    assert (tmp_path / "search" / SEARCH_STATE).exists()


def killed_at_call(call: int, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Candidate training that raises at its `call`-th call (from 1); the calls so far (`n`)."""
    train, calls = search_module.train_candidate, {"n": 0}

    def killed(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == call:
            raise RuntimeError("killed")
        train(*args, **kwargs)

    monkeypatch.setattr(search_module, "train_candidate", killed)
    return calls


def test_killed_search_resumes_with_the_samples_of_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, uninterrupted = search_in(tmp_path / "whole")
    train = search_module.train_candidate
    killed_at_call(3, monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        search_in(tmp_path / "killed")
    partial = json.loads((tmp_path / "killed" / "search" / CANDIDATES).read_text())
    assert [r["index"] for r in partial] == [0, 1]
    monkeypatch.setattr(search_module, "train_candidate", train)
    _, resumed = search_in(tmp_path / "killed")
    assert [(r["index"], r["tokens"]) for r in resumed] == [
        (r["index"], r["tokens"]) for r in uninterrupted
    ]
    assert [r["reward"] for r in resumed] == pytest.approx(
        [r["reward"] for r in uninterrupted], abs=1e-6
    )


def test_a_resumed_search_of_other_data_or_space_is_refused_before_a_candidate_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = killed_at_call(2, monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        search_in(tmp_path)
    with pytest.raises(SearchMismatch, match=r"\(data.val_size: 48 there, 64 here\); resume it"):
        search_in(tmp_path, val_size=64)
    with pytest.raises(SearchMismatch, match=r"\(space.groups: 4 there, 2 here\)"):
        search_in(tmp_path, groups=2)
    assert trained["n"] == 2  # refused before any candidate trained


def fake_evaluate(settings: S2DSettings, index: int) -> dict[str, Any]:
    """A cheap, deterministic reward standing in for training (it favours late split points)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return {"reward": sum(settings.split_points[0]) / 10, "scored_on": rank}


def _search_with_fake_rewards(phase_dir: Path) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    controller = Controller(num_layer_groups=2, num_stages=3, groups=8, hidden_size=16)
    learner = Reinforce(controller, lr=0.01, baseline_decay=0.9, entropy_weight=0.0)
    cfg = S2DNASSearchConfig(iterations=3, candidates_per_iteration=4)
    search = ControllerSearch(controller, learner, fake_evaluate, cfg, space={}, data={})
    return SearchDriver(search, phase_dir, seed=0).run().records


def _rank_main(rank: int, world: int, port: int, phase_dir: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        records = _search_with_fake_rewards(Path(phase_dir))
        Path(out, f"rank{rank}.json").write_text(json.dumps(records))
    finally:
        dist.destroy_process_group()


def test_candidates_are_spread_over_two_gloo_ranks_with_the_single_process_result(
    tmp_path: Path,
) -> None:
    single = _search_with_fake_rewards(tmp_path / "single")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (2, port, str(tmp_path / "ddp"), str(tmp_path))
    mp.start_processes(_rank_main, args=args, nprocs=2, join=True, start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank ends with the same records (and controller)
    assert [c["tokens"] for c in ranks[0]] == [c["tokens"] for c in single]
    # candidate j of each round ran on rank j
    assert [c["rank"] for c in ranks[0]] == [c["scored_on"] for c in ranks[0]] == [0, 1] * 6


def test_search_killed_in_retrain_2_resumes_there_and_ends_as_an_uninterrupted_one(
    compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = [
        *S2D_SEARCH,
        "technique.search.iterations=1",
        "technique.search.candidate_batches=1",
        "technique.search.top_k=2",
        "dataset.batch_size=16",
        "trainer.max_epochs=1",
        "evaluation.anytime=false",
        "logger=none",
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_job(compose_cfg(overrides, config_name="search", run_dir=whole))

    step = S2DNASModule.training_step

    def signalled_in_retrain_2(self: S2DNASModule, batch: Any, batch_idx: int) -> Any:
        if self.current_phase == "retrain_2" and self.global_step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(S2DNASModule, "training_step", signalled_in_retrain_2)
    with pytest.raises(Preempted):
        run_job(compose_cfg(overrides, config_name="search", run_dir=killed))
    checkpoints = killed / "checkpoints"
    assert (checkpoints / "retrain_1" / "done").exists()
    assert not (checkpoints / "retrain_2" / "done").exists()
    assert (
        torch.load(checkpoints / "retrain_2" / "last.ckpt", weights_only=False)["global_step"] == 3
    )
    finished = {p: (checkpoints / p / "final.ckpt").stat().st_mtime_ns for p in SEARCH_PHASES}

    monkeypatch.setattr(S2DNASModule, "training_step", step)
    monkeypatch.setattr(S2DNASModule, "_search", lambda *_: pytest.fail("the search ran again"))
    run_job(compose_cfg(overrides, config_name="search", run_dir=killed))
    assert {p: (checkpoints / p / "final.ckpt").stat().st_mtime_ns for p in SEARCH_PHASES} == (
        finished
    )
    for phase in ("retrain_2", "select"):
        ends = [
            torch.load(run / "checkpoints" / phase / "final.ckpt", weights_only=False)
            for run in (whole, killed)
        ]
        assert ends[0]["dynlab"] == ends[1]["dynlab"]
        for name, value in ends[0]["state_dict"].items():
            torch.testing.assert_close(ends[1]["state_dict"][name], value, rtol=0, atol=0)
    assert read_results(killed)["status"] == "completed"
    assert read_results(killed)["metrics"] == read_results(whole)["metrics"]
    # results.json: early exit on test at the selected network's val thresholds (fixed: 0.9)
    inference = read_results(killed)["s2dnas_thresholds"]
    assert inference == read_results(whole)["s2dnas_thresholds"]
    assert inference["rule"] == "threshold" and inference["thresholds"] == [0.9]
