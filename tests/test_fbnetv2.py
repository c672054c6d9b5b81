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

from dynlab.backbones import create_backbone
from dynlab.preemption import Preempted
from dynlab.results import read_results
from dynlab.runner import run_job
from dynlab.search import RESULT, SupernetExits
from dynlab.techniques.fbnetv2.module import (
    FBNetV2Module,
    cost_distance,
    cost_span,
    extreme_choices,
    sampled_distance,
    search_loss,
)
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
        # The argmax network's MACs and the expected MACs of the search's softmax, every epoch.
        search = results["search"]
        assert search["target_mmacs"] is None and search["expected_mmacs"] > 0
        assert (
            search["architecture"] == _result(run)["architecture"] and search["search"] == "fbnetv2"
        )
        assert all(h["expected_mmacs"] > 0 for h in _result(run)["history"])
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
            f"technique.architecture_file={choices_file}",
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


# --- a MACs target (technique.target_mmacs) -----------------------------------------------------
def test_the_distance_to_the_target_is_least_with_zero_gradient_there_and_pulls_both_ways() -> None:
    target = 20e6
    costs = torch.linspace(5e6, 35e6, 61, dtype=torch.float64, requires_grad=True)
    distances = cost_distance(costs, target)
    distances.sum().backward()
    assert costs.grad is not None
    values = distances.detach().tolist()
    at = values.index(min(values))
    assert float(costs[at].detach()) == target and values[at] == 0
    assert costs.grad[at] == 0  # the target: zero gradient
    assert (costs.grad[:at] < 0).all() and (costs.grad[at + 1 :] > 0).all()  # toward it
    assert values[at - 10] == pytest.approx(values[at + 10])  # |cost / target - 1|: symmetric


def test_the_sampled_distance_is_its_expectation_with_a_reinforce_gradient() -> None:
    """At logits peaked on one architecture the draws are that architecture: at its own MACs the
    distance and every logit's gradient are zero; elsewhere the estimate is that of the exact
    expectation over the whole (tiny) space."""
    torch.manual_seed(0)
    net = create_backbone("cifar_fbnetv2_supernet_tiny", num_classes=10, in_chans=1)
    cheapest = extreme_choices(net, min)
    with torch.no_grad():
        for key, value in cheapest.items():
            indices = value if key != "resolution" else [value]
            for alpha, i in zip(net._alphas(key), indices, strict=True):
                alpha.fill_(0).data[i] = 30.0  # softmax: 1 - 3e-13 on the cheapest option
    macs_of = lambda weights: net.expected_cost("macs", weights)  # noqa: E731
    net.fix(cheapest)
    macs = float(net.expected_macs())
    net.unfix()
    distance = sampled_distance(net, macs_of, macs, 8)
    distance.backward()
    assert float(distance.detach()) == 0 and all(
        float(p.grad.abs().max()) == 0 for p in net.arch_parameters()
    )
    net.zero_grad()
    torch.manual_seed(0)
    assert float(sampled_distance(net, macs_of, 2 * macs, 8).detach()) == pytest.approx(0.5)
    # Uniform logits: the mean over many draws approaches E|MACs / target - 1|; the gradient
    # pushes toward the target (the cheapest choices lose probability for a dear target).
    with torch.no_grad():
        for p in net.arch_parameters():
            p.zero_()
    torch.manual_seed(0)
    dear = sampled_distance(net, macs_of, 2.0e6, 512)
    dear.backward()
    assert 0.3 < float(dear.detach()) < 0.8
    assert float(net.alpha_resolution.grad[cheapest["resolution"]]) > 0  # descent lowers it


@pytest.mark.parametrize("target_mmacs", [0.5, 2.2])
def test_a_target_moves_the_search_toward_it(compose_cfg, target_mmacs: float) -> None:
    """A few architecture steps (Adam, as the search's recipe) with the module's loss on random
    data move the expected MACs of the tiny supernet's softmax from their start (about 1 M)
    toward the target, from below and from above."""
    _, module = build_run(compose_cfg([*FBNET, f"technique.target_mmacs={target_mmacs}"]))
    net = module._supernet.train()
    net.tau = 5.0
    optimizer = torch.optim.Adam(net.arch_parameters(), lr=0.01)
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def expected() -> float:
        with torch.no_grad():
            return float(net.expected_cost("macs", net.softmax_weights())) / 1e6

    start = expected()
    for _ in range(20):
        ce = torch.nn.functional.cross_entropy(net(x), y)
        loss = module.arch_loss(ce, net.expected_macs().float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert abs(expected() - target_mmacs) < abs(start - target_mmacs) - 0.1


def test_the_architecture_loss_is_fbnets_unless_a_target_is_set(compose_cfg) -> None:
    """Unset, FBNet's loss on the sampled network's cost; set, CE plus the sampled distance, its
    draws from (seed, step)."""
    ce, cost = torch.tensor(1.1), torch.tensor(3e6, dtype=torch.float64)
    _, module = build_run(compose_cfg(FBNET))
    assert module.config.target_mmacs is None
    assert module.arch_loss(ce, cost) == search_loss(ce, cost, 0.2, 0.6, module.cost_reference)
    assert module.cost_reference == cost_span(module._supernet, "macs")[0] > 0
    _, module = build_run(compose_cfg([*FBNET, "technique.target_mmacs=1.5"]))
    config = module.config
    assert (config.target_mmacs, config.target_weight, config.target_samples) == (1.5, 1.0, 32)
    loss = module.arch_loss(ce, cost)
    assert loss == module.arch_loss(ce, cost)  # the same draws at the same step
    assert 1.1 < float(loss.detach()) < 1.1 + 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("technique.target_mmacs=0", "target_mmacs=0.0 must be a number of M MACs > 0"),
        ("technique.target_mmacs=1 technique.cost=params", "target_mmacs needs cost=macs"),
        ("technique.target_mmacs=1 technique.target_weight=0", "target_weight=0.0 must be > 0"),
        ("technique.target_mmacs=1 technique.target_samples=1", "target_samples=1 must be >= 2"),
        ("technique.target_mmacs=40", "lies outside the space, whose architectures span"),
    ],
)
def test_a_bad_target_is_refused_before_anything_runs(
    compose_cfg, override: str, message: str
) -> None:
    cfg = compose_cfg([*FBNET, *override.split()])
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)
        build_run(cfg)


def test_extreme_choices_are_the_spaces_cheapest_and_dearest() -> None:
    net = create_backbone("cifar_fbnetv2_supernet_tiny", num_classes=10, in_chans=1)
    cheapest, dearest = extreme_choices(net, min), extreme_choices(net, max)
    costs = []
    for choices in (cheapest, dearest):
        net.fix(choices)
        costs.append(float(net.expected_macs()))
    net.unfix()
    assert costs[0] < costs[1]
    assert net.decode(cheapest)["resolution"] == 16 and net.decode(dearest)["resolution"] == 32


def test_the_cost_term_is_unit_free_with_elasticity_beta() -> None:
    """The same loss whatever the cost's unit (MACs or M MACs, below 1 where FBNet's log turns
    negative), and d log L / d log cost = beta, for any cost."""
    ce = torch.tensor(0.7)
    for beta in (0.05, 0.6, 8.0):
        for cost in (2.5e5, 3e8):
            c = torch.tensor(cost, dtype=torch.float64, requires_grad=True)
            loss = search_loss(ce, c, 0.2, beta, 1.2e5)
            in_millions = search_loss(
                ce, torch.tensor(cost / 1e6, dtype=torch.float64), 0.2, beta, 0.12
            )
            assert float(loss) == pytest.approx(float(in_millions), rel=1e-12)
            (grad,) = torch.autograd.grad(loss, c)
            assert float(grad * c / loss) == pytest.approx(beta, rel=1e-9)
