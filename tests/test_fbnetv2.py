"""FBNetV2 end to end on digits: the DMaskingNAS search (two optimisers on two streams, warm-up,
annealed temperature), the cost weight's effect on the searched widths, exact resume after a kill,
the exported network retrained; bad input refused before anything runs."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from dynlab.preemption import Preempted
from dynlab.results import read_results
from dynlab.runner import run_job
from dynlab.search import RESULT, SupernetExits
from dynlab.techniques.fbnetv2.module import FBNetV2Module
from dynlab.validation import ConfigError, build_run, validate_config

from .conftest import compose_in

# The tiny space on digits: 4 search epochs of 8 steps (the first weights-only).
FBNET = [
    "technique=fbnetv2",
    "backbone=cifar_fbnetv2_supernet_tiny",
    "dataset=digits",
    "dataset.batch_size=64",
    "technique.warmup_epochs=1",
    "technique.temperature=2.0",
    "technique.phases.search.epochs=4",
    "trainer.max_epochs=4",
    "trainer.limit_train_batches=8",
    "trainer.enable_progress_bar=false",
    "evaluation.budgeted=false",
    "logger=none",
]
WEAK, STRONG = "technique.beta=0.05", "technique.beta=8.0"


@pytest.fixture(scope="module")
def searches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two dynlab-search runs, weak and strong cost weight, shared by the tests below."""
    runs = {}
    for name, beta in (("weak", WEAK), ("strong", STRONG)):
        run = tmp_path_factory.mktemp("fbnetv2") / name
        run_job(compose_in([*FBNET, beta], "search", run))
        runs[name] = run
    return runs


def _result(run: Path) -> dict[str, Any]:
    return json.loads((run / "checkpoints" / "search" / RESULT).read_text())


@pytest.mark.slow
def test_a_strong_cost_weight_searches_a_cheaper_network(searches: dict[str, Path]) -> None:
    weak, strong = _result(searches["weak"]), _result(searches["strong"])
    assert strong["mmacs"] < weak["mmacs"]
    # The temperature was annealed once an epoch from 2.0.
    assert [h["tau"] for h in weak["history"]] == pytest.approx(
        [2.0 * 0.956**e for e in range(4)], rel=1e-3
    )
    for run in searches.values():
        results = read_results(run)
        assert results["status"] == "completed"
        # The search-only run is evaluated on the exported argmax network, its MACs measured.
        assert results["exit_macs"][0] == pytest.approx(_result(run)["mmacs"] * 1e6)


@pytest.mark.slow
def test_the_searched_network_retrained_learns_and_costs_what_was_measured(
    compose_cfg, searches: dict[str, Path]
) -> None:
    choices_file = searches["weak"] / "checkpoints" / "search" / RESULT
    cfg = compose_cfg(
        [
            *FBNET,
            f"technique.choices_file={choices_file}",
            "trainer.max_epochs=5",
            "trainer.limit_train_batches=null",
        ]
    )
    run_job(cfg)
    results = read_results(Path(cfg.run_dir))
    assert results["metrics"]["test/top1"] > 80.0  # chance: 10 %
    assert results["exit_macs"][0] == pytest.approx(_result(searches["weak"])["mmacs"] * 1e6)
    assert not (Path(cfg.run_dir) / "checkpoints" / "search").exists()


@pytest.mark.slow
def test_search_killed_mid_way_resumes_exactly(
    compose_cfg, searches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both optimisers, both streams and the temperature continue as in an uninterrupted run."""
    step = FBNetV2Module.training_step

    def signalled(self: FBNetV2Module, batch: Any, batch_idx: int) -> Any:
        if self.global_step == 30:  # optimiser steps: in epoch 2, both optimisers have state
            os.kill(os.getpid(), signal.SIGUSR1)
        return step(self, batch, batch_idx)

    killed = tmp_path / "killed"
    monkeypatch.setattr(FBNetV2Module, "training_step", signalled)
    with pytest.raises(Preempted):
        run_job(compose_cfg([*FBNET, WEAK], config_name="search", run_dir=killed))
    assert not (killed / "checkpoints" / "search" / "done").exists()
    monkeypatch.setattr(FBNetV2Module, "training_step", step)
    run_job(compose_cfg([*FBNET, WEAK], config_name="search", run_dir=killed))
    ends = [
        torch.load(run / "checkpoints" / "search" / "final.ckpt", weights_only=False)
        for run in (searches["weak"], killed)
    ]
    assert ends[0]["dynlab"] == ends[1]["dynlab"]
    for name, value in ends[0]["state_dict"].items():
        torch.testing.assert_close(ends[1]["state_dict"][name], value, rtol=0, atol=0)
    for a, b in zip(ends[0]["optimizer_states"], ends[1]["optimizer_states"], strict=True):
        for key, state in a["state"].items():
            for name, value in state.items():
                torch.testing.assert_close(b["state"][key][name], value, rtol=0, atol=0)


@pytest.mark.slow
def test_deploy_form_of_the_search_equals_the_supernet_at_its_argmax(
    compose_cfg, searches: dict[str, Path]
) -> None:
    final = searches["strong"] / "checkpoints" / "search" / "final.ckpt"
    cfg = compose_cfg([*FBNET, f"ckpt_path={final}"], config_name="search")
    _, module = build_run(cfg)
    from dynlab.checkpointing import load_module_state

    load_module_state(module, final)
    assert isinstance(module.model, SupernetExits)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            module.deploy().forward_exits(x)[0], module.model.eval()(x), atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+backbone.kwargs.resolutions=[48,32]"], "resolution"),
        (["technique.phases.search.epochs=1"], "warm-up"),
        (["backbone=cifar_resnet20"], "cifar_fbnetv2_supernet"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(
    compose_cfg, overrides: list[str], message: str
) -> None:
    cfg = compose_cfg([*FBNET, *overrides])
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)
        build_run(cfg)


@pytest.mark.parametrize("override", ["technique.alpha=0", "technique.beta=-1"])
def test_a_cost_weight_not_above_zero_fails_at_validation(compose_cfg, override: str) -> None:
    cfg = compose_cfg([*FBNET, override])
    with pytest.raises(ConfigError, match="must be > 0"):
        validate_config(cfg)


@pytest.mark.parametrize("preset", ["digits", "cifar10", "imagenet_f"])
def test_presets_compose_and_validate(compose_cfg, preset: str) -> None:
    cfg = compose_cfg([f"+experiment=fbnetv2/{preset}"])
    validate_config(cfg)
    assert cfg.technique.name == "fbnetv2" and cfg.expected.paper and cfg.expected.dynlab
    search = cfg.technique.phases.search
    assert search.epochs > cfg.technique.warmup_epochs
    assert set(search.optimizers) == set(search.streams) == {"weights", "arch"}
