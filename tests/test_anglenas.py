"""technique=anglenas: the angle of a path, the operators' scores and drops as the official code,
a digits search that shrinks the tiny space to its stopping size and searches only what is left,
exact resume across a drop, and settings that cannot work refused before training."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from dynlab import checkpointing as ckpt
from dynlab import runner
from dynlab.backbones import create_backbone
from dynlab.preemption import Preempted, PreemptionHandler
from dynlab.runner import run_job
from dynlab.search import RESULT
from dynlab.search.ledger import RECORDS
from dynlab.techniques.anglenas.shrinking import (
    AngleMeter,
    ShrunkSpace,
    lowest,
    score_operators,
)
from dynlab.validation import ConfigError, build_run, validate_config

from .conftest import search_once

# The tiny space (5 layers x 4 blocks) on digits: drops of 5 operators after 3 epochs, then every
# epoch, until at most 64 of the 1,024 architectures are left; a fresh supernet, a small evolution.
ANGLENAS = [
    "technique=anglenas",
    "backbone=cifar_spos_supernet_tiny",
    "dataset=digits",
    "dataset.batch_size=64",
    "technique.optim.lr=0.1",
    "technique.shrinking.first_epochs=3",
    "technique.shrinking.step_epochs=1",
    "technique.shrinking.stop_size=64",
    "technique.shrinking.paths_per_operator=40",
    "technique.phases.shrink.epochs=12",
    "technique.phases.supernet.epochs=4",
    "technique.evolution.population=6",
    "technique.evolution.generations=2",
    "technique.evolution.parents=3",
    "technique.evolution.mutations=2",
    "technique.evolution.crossovers=2",
    "technique.evolution.recalibration_batches=4",
    "technique.evolution.val_images=200",
    "trainer.enable_progress_bar=false",
    "evaluation.budgeted=false",
    "logger=csv",
]


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return search_once(tmp_path_factory, "anglenas", ANGLENAS)


def _result(run: Path) -> dict:
    return json.loads((run / "checkpoints" / "evolution" / RESULT).read_text())


# --- the official rules ---------------------------------------------------------------------------
def test_the_angle_is_that_of_the_concatenated_conv_and_classifier_weights() -> None:
    torch.manual_seed(0)
    net = create_backbone("cifar_spos_supernet_tiny", num_classes=10, in_chans=1)
    reference = create_backbone("cifar_spos_supernet_tiny", num_classes=10, in_chans=1)
    reference.load_state_dict(net.state_dict())
    meter = AngleMeter(net, reference)
    genes = (0, 3, 1, 2, 0)
    assert meter.angle(genes) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meter = AngleMeter(net, reference)
    with torch.no_grad():
        now = torch.cat([w.flatten() for _, w in net.path_weights(genes)]).double()
        then = torch.cat([w.flatten() for _, w in reference.path_weights(genes)]).double()
    expected = math.acos(float(torch.nn.functional.cosine_similarity(now, then, dim=0)))
    assert meter.angle(genes) == pytest.approx(expected, rel=1e-9)
    # No BN weight and no bias is part of it: moving them leaves the angle as it was.
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 1:
                p.mul_(3.0)
    assert AngleMeter(net, reference).angle(genes) == pytest.approx(expected, rel=1e-9)


def test_drops_take_the_smallest_angles_first_and_leave_every_layer_one_operator() -> None:
    space = ShrunkSpace.full([3, 2, 2])
    scores = {(0, 0): 0.1, (0, 1): 0.5, (0, 2): 0.05, (1, 0): 0.01, (1, 1): 0.02, (2, 0): 0.9}
    scores[(2, 1)] = 0.3
    dropped = lowest(scores, space, 4)
    # (1, 0) goes; (1, 1) is its layer's last, so it stays though it is next; then (0, 2), (0, 0).
    assert [op for op, _ in dropped] == [(1, 0), (0, 2), (0, 0), (2, 1)]
    space.drop([op for op, _ in dropped])
    assert space.operations == [[1], [1], [0]] and space.size == 1.0
    assert lowest({(0, 0): 0.1, (0, 1): 0.2}, ShrunkSpace.full([2]), 5) == [((0, 0), 0.1)]


def test_scoring_paths_pass_through_their_operator_and_place_identity_only_where_allowed() -> None:
    # Layer 1 cannot be identity (choice 3 is identity elsewhere), as the official first layer of
    # a stage; every sampled path is distinct and joins the pools of all the operators it holds.
    space = ShrunkSpace([[0, 1, 3], [0, 1], [0, 2, 3], [1, 3]])
    seen: list[tuple[int, ...]] = []

    def angle(genes: tuple[int, ...]) -> float:
        seen.append(genes)
        return float(sum(genes))

    scores = score_operators(space, angle, np.random.default_rng(0), 6, identity=3)
    assert set(scores) == {(i, c) for i, ops in enumerate(space.operations) for c in ops}
    assert len(seen) == len(set(seen))  # each path's angle computed once
    assert all(g[1] != 3 and space.contains(g) for g in seen)
    assert any(g.count(3) >= 2 for g in seen)  # depth sampling sets several layers to identity
    # An operator's score is the mean over paths through it.
    through = [g for g in seen if g[2] == 2][:6]
    assert scores[(2, 2)] == pytest.approx(np.mean([sum(g) for g in through]))


# --- a search on digits -----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_search_shrinks_to_the_stopping_size_and_searches_only_what_is_left(
    searched: Path,
) -> None:
    result = _result(searched)
    shrinking = result["shrinking"]
    ops = shrinking["operations"]
    assert math.prod(len(o) for o in ops) == shrinking["size"] <= 64
    assert all(len(o) >= 1 for o in ops)
    steps = shrinking["steps"]
    # A drop after 3 epochs, then one every epoch, 5 operators each (4 blocks + 1), until <= 64.
    assert [s["epoch"] for s in steps] == list(range(3, 3 + len(steps)))
    assert all(len(s["dropped"]) == 5 for s in steps)
    assert steps[-2]["size"] > 64 >= steps[-1]["size"]
    dropped = {(layer, choice) for s in steps for layer, choice, _ in s["dropped"]}
    assert dropped.isdisjoint({(layer, c) for layer, o in enumerate(ops) for c in o})
    records = json.loads((searched / "checkpoints" / "evolution" / RECORDS).read_text())
    assert records and all(
        all(g in o for g, o in zip(r["genes"], ops, strict=True)) for r in records
    )
    assert all(g in o for g, o in zip(result["architecture"], ops, strict=True))
    # The shrink phase stopped at the stopping size, long before its 12 epochs.
    results = json.loads((searched / "results.json").read_text())
    assert results["status"] == "completed"
    assert results["metrics"]["test/top1"] > 30.0  # the winner with inherited weights learns


@pytest.mark.slow
def test_the_search_supernet_starts_fresh_and_trains_on_the_shrunk_space(
    compose_cfg, searched: Path
) -> None:
    shrink = torch.load(
        ckpt.phase_dir(searched, "shrink") / ckpt.FINAL, map_location="cpu", weights_only=False
    )
    supernet = torch.load(
        ckpt.phase_dir(searched, "supernet") / ckpt.FINAL, map_location="cpu", weights_only=False
    )
    assert "reference" in shrink["dynlab"]["technique"]["shrinking"]
    assert "reference" not in supernet["dynlab"]["technique"]["shrinking"]
    # Operators dropped before the supernet phase never train in it: their weights stay as the
    # fresh supernet's initialisation made them (and differ from the shrink phase's).
    _, module = build_run(compose_cfg(ANGLENAS, config_name="search"))
    module.start_phase(runner.schedule(module, compose_cfg(ANGLENAS, "search"))[1])
    fresh = {k: v.clone() for k, v in module.model.state_dict().items()}
    layer, choice, _ = shrink["dynlab"]["technique"]["shrinking"]["steps"][0]["dropped"][0]
    key = f"net.layers.{layer}.{choice}.main.0.conv.weight"
    assert torch.equal(supernet["state_dict"][f"model.{key}"], fresh[key])
    assert not torch.equal(shrink["state_dict"][f"model.{key}"], fresh[key])


class _SignalAfterFirstDrop(PreemptionHandler):
    """The real handler, plus SIGUSR1 at the first step after the first drop."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if len(getattr(pl_module, "shrink_steps", [])) == 1 and not getattr(self, "_sent", False):
            self._sent = True
            os.kill(os.getpid(), signal.SIGUSR1)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


@pytest.mark.slow
def test_a_shrink_killed_between_drops_resumes_with_the_same_drops_and_weights(
    compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, searched: Path
) -> None:
    overrides = [*ANGLENAS, "phase=shrink"]
    with monkeypatch.context() as patch:
        patch.setattr(runner, "PreemptionHandler", _SignalAfterFirstDrop)
        with pytest.raises(Preempted):
            run_job(compose_cfg(overrides, config_name="search", run_dir=tmp_path / "cut"))
    run_job(compose_cfg(overrides, config_name="search", run_dir=tmp_path / "cut"))
    straight = torch.load(
        ckpt.phase_dir(searched, "shrink") / ckpt.FINAL, map_location="cpu", weights_only=False
    )
    cut = torch.load(
        ckpt.phase_dir(tmp_path / "cut", "shrink") / ckpt.FINAL,
        map_location="cpu",
        weights_only=False,
    )
    assert (
        cut["dynlab"]["technique"]["shrinking"]["steps"]
        == (straight["dynlab"]["technique"]["shrinking"]["steps"])
    )
    for name, value in straight["state_dict"].items():
        assert torch.equal(value, cut["state_dict"][name]), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["technique.phases.shrink.epochs=2"],
            "shrink phase trains 2 epochs, fewer than technique.shrinking.first_epochs=3",
        ),
        (["technique.sampler.kind=macs_bins"], "technique.sampler.kind must be uniform"),
        (["technique.shrinking.stop_size=0"], "stop_size must be a space size >= 1"),
        (
            ["backbone=cifar_resnet20"],
            "technique=anglenas needs an SPOS one-shot supernet as its backbone and cifar_resnet20",
        ),
    ],
)
def test_settings_that_cannot_work_are_refused_before_training(
    compose_cfg, overrides: list[str], message: str
) -> None:
    cfg = compose_cfg([*ANGLENAS, *overrides], config_name="search")
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)
        _, module = build_run(cfg)
        module.check_run(cfg)


# --- the official MobileNet-like space -------------------------------------------------------------
def test_the_mobilenet_space_is_the_official_one() -> None:
    from dynlab.backbones.anglenas_mobilenet import OFFICIAL_ARCH

    with torch.device("meta"):
        net = create_backbone("anglenas_mobilenet_supernet", num_classes=1000)
    space = net.space
    assert space.num_layers == 21 and sum(space.gene_choices()) == 141  # official main.py l.78
    assert [i for i, n in enumerate(space.gene_choices()) if n == 6] == [0, 4, 8, 12, 16, 20]
    assert "not on layers" in space.problem((6,) + OFFICIAL_ARCH[1:])
    table = net.macs_table((3, 224, 224))
    # The released ABS architecture: 472 M FLOPs in the official README, counted by its thop,
    # which takes (2 x 1728 - 1) x 1000 for the classifier where dynlab counts 1728 x 1000.
    thop_fc = (2 * 1728 - 1) * 1000 - 1728 * 1000
    assert (table.macs(OFFICIAL_ARCH) + thop_fc) / 1e6 == pytest.approx(472.5, abs=0.1)


def test_a_mobilenet_child_computes_the_supernet_path_and_costs_its_table_entry() -> None:
    from dynlab.evaluation.macs import count_macs

    torch.manual_seed(0)
    net = create_backbone("cifar_anglenas_mobilenet_supernet", num_classes=10, in_chans=1).eval()
    table = net.macs_table((1, 32, 32))
    rng = np.random.default_rng(0)
    x = torch.randn(2, 1, 32, 32)
    for _ in range(3):
        genes = tuple(int(rng.integers(n)) for n in net.space.gene_choices())
        net.set_path(genes)
        child = net.child(genes).eval()
        assert len(child.layers) == sum(g != 6 for g in genes)  # identity layers left out
        torch.testing.assert_close(child(x), net(x))
        assert count_macs(child, (1, 32, 32)) == pytest.approx(table.macs(genes))


@pytest.mark.parametrize("preset", ["digits", "imagenet"])
def test_presets_compose_validate_and_their_macs_limit_binds(compose_cfg, preset) -> None:
    cfg = compose_cfg([f"+experiment=anglenas/{preset}"])
    validate_config(cfg)
    assert cfg.technique.name == "anglenas" and cfg.expected.paper and cfg.expected.dynlab
    size = (3, 224, 224) if preset == "imagenet" else (3, 32, 32)
    with torch.device("meta"):
        net = create_backbone(cfg.backbone.name, num_classes=10)
    table = net.macs_table(size)
    limit = cfg.technique.evolution.max_mmacs * 1e6
    assert table.minimum() < limit < table.maximum()
    if preset == "imagenet":  # the released architecture fits the official 475 M FLOPs
        from dynlab.backbones.anglenas_mobilenet import OFFICIAL_ARCH

        assert table.macs(OFFICIAL_ARCH) <= limit
        assert math.prod(net.space.gene_choices()) == 7**15 * 6**6
