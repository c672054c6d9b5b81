"""SPOS end to end on digits: supernet -> evolution under a tight MACs limit -> retrain of the
winner; the evolution alone from a supernet checkpoint, killed and resumed; one path per step with
no update off the path; bad input refused before anything runs."""

from __future__ import annotations

import itertools
import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from dynlab.backbones import create_backbone
from dynlab.backbones.spos_shufflenetv2 import MacsTable
from dynlab.preemption import Preempted
from dynlab.results import read_results
from dynlab.runner import run_job
from dynlab.search import RESULT, SupernetExits, derived_seed
from dynlab.search import supernet as scoring
from dynlab.search.evolution import space_range_problem
from dynlab.search.ledger import RECORDS
from dynlab.techniques.base import Phase
from dynlab.techniques.spos.module import PATH_STREAM
from dynlab.techniques.supernet_config import EvolutionConfig
from dynlab.validation import ConfigError, build_run, validate_config

from .conftest import search_once

# The 5-layer space on digits (32x32): a short supernet phase and a small evolution whose MACs
# limit (MAX_MMACS) keeps out the dearest architectures.
MAX_MMACS = 0.85
SPOS = [
    "technique=spos",
    "backbone=cifar_spos_supernet_tiny",
    "dataset=digits",
    "dataset.batch_size=64",
    "technique.optim.lr=0.1",
    "technique.evolution.population=6",
    "technique.evolution.generations=2",
    "technique.evolution.parents=3",
    "technique.evolution.mutations=2",
    "technique.evolution.crossovers=2",
    "technique.evolution.recalibration_batches=4",
    "technique.evolution.recalibration_batch_size=64",
    "technique.evolution.val_images=200",
    f"technique.evolution.max_mmacs={MAX_MMACS}",
    "trainer.max_epochs=20",
    "trainer.enable_progress_bar=false",
    "evaluation.budgeted=false",
    "logger=csv",
]


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dynlab-search run (supernet, evolution) shared by the tests below."""
    return search_once(tmp_path_factory, "spos", SPOS)


def _result(run: Path) -> dict[str, Any]:
    return json.loads((run / "checkpoints" / "evolution" / RESULT).read_text())


@pytest.mark.slow
def test_search_finds_a_legal_architecture_within_the_limit(searched: Path) -> None:
    result = _result(searched)
    records = json.loads((searched / "checkpoints" / "evolution" / RECORDS).read_text())
    assert result["search"] == "spos" and result["architecture"] == result["blocks"]
    assert len(result["blocks"]) == 5 and all(0 <= b < 4 for b in result["blocks"])
    assert result["mmacs"] <= MAX_MMACS
    assert all(r["macs"] <= MAX_MMACS * 1e6 for r in records)
    # The limit really binds: the space's dearest architecture lies above it.
    assert result["space"]["maximum_mmacs"] > MAX_MMACS
    genes = [tuple(r["genes"]) for r in records]
    assert len(genes) == len(set(genes))  # no candidate evaluated twice
    assert result["supernet_val_top1"] == max(r["top1"] for r in records)
    # The supernet already separates the digits on its best path (chance: 10 %).
    assert result["supernet_val_top1"] > 40.0
    front = result["pareto"]
    assert [p["mmacs"] for p in front] == sorted(p["mmacs"] for p in front)
    assert [p["top1"] for p in front] == sorted(p["top1"] for p in front)
    assert (searched / "plots" / "pareto.png").stat().st_size > 0
    table = (searched / "checkpoints" / "evolution" / "pareto.md").read_text().splitlines()
    assert len(table) == 2 + len(front)
    results = read_results(searched)
    assert results["status"] == "completed"
    assert results["search"]["architecture"] == result["architecture"]
    # A search-only run is evaluated on the winner cut out of the supernet.
    assert results["exit_macs"][0] == pytest.approx(result["mmacs"] * 1e6)


@pytest.mark.slow
def test_the_winner_retrained_from_the_search_output_learns_and_costs_what_was_recorded(
    compose_cfg, searched: Path
) -> None:
    result = searched / "checkpoints" / "evolution" / RESULT
    cfg = compose_cfg([*SPOS, f"technique.architecture_file={result}", "trainer.max_epochs=6"])
    run_job(cfg)
    results = read_results(Path(cfg.run_dir))
    assert results["status"] == "completed"
    assert results["metrics"]["test/top1"] > 80.0  # chance: 10 %
    # The MACs the search recorded are those measured on the standalone net.
    assert results["exit_macs"][0] == pytest.approx(
        _result(searched)["mmacs"] * 1e6, rel=0, abs=0.5
    )
    state = torch.load(
        Path(cfg.run_dir) / "checkpoints" / "retrain" / "final.ckpt", weights_only=False
    )
    assert state["dynlab"]["technique"]["architecture"] == _result(searched)["architecture"]
    assert not (Path(cfg.run_dir) / "checkpoints" / "supernet").exists()


@pytest.mark.slow
def test_evolution_alone_from_the_supernet_checkpoint_resumes_exactly_after_a_kill(
    compose_cfg, searched: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    supernet = searched / "checkpoints" / "supernet" / "final.ckpt"
    overrides = [*SPOS, f"ckpt_path={supernet}", "phase=evolution"]
    killed = tmp_path / "killed"
    recalibrate = scoring.recalibrate_bn
    calls = {"n": 0}

    def signalled_at_the_fourth(*args: Any, **kwargs: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGUSR1)  # Slurm's warning: stop at the next boundary
        return recalibrate(*args, **kwargs)

    monkeypatch.setattr(scoring, "recalibrate_bn", signalled_at_the_fourth)
    with pytest.raises(Preempted):
        run_job(compose_cfg(overrides, config_name="search", run_dir=killed))
    phase = killed / "checkpoints" / "evolution"
    partial = json.loads((phase / RECORDS).read_text())
    assert [r["index"] for r in partial] == [0, 1, 2, 3]
    monkeypatch.setattr(scoring, "recalibrate_bn", recalibrate)
    run_job(compose_cfg(overrides, config_name="search", run_dir=killed))
    whole = json.loads((searched / "checkpoints" / "evolution" / RECORDS).read_text())
    resumed = json.loads((phase / RECORDS).read_text())
    assert [(r["genes"], r["round"]) for r in resumed] == [(r["genes"], r["round"]) for r in whole]
    assert [r["top1"] for r in resumed] == pytest.approx([r["top1"] for r in whole], abs=1e-9)
    assert _result(killed)["architecture"] == _result(searched)["architecture"]


@pytest.mark.slow
def test_deploy_form_of_the_searched_supernet_equals_its_path(compose_cfg, searched: Path) -> None:
    cfg = compose_cfg([*SPOS, f"ckpt_path={searched / 'checkpoints' / 'evolution' / 'final.ckpt'}"])
    datamodule, module = build_run(cfg)
    from dynlab.checkpointing import load_module_state

    load_module_state(module, cfg.ckpt_path)
    assert isinstance(module.model, SupernetExits)
    assert list(module.model.net.path) == _result(searched)["architecture"]
    x = torch.randn(4, 3, 32, 32)
    deployed = module.deploy()
    with torch.no_grad():
        torch.testing.assert_close(
            deployed.forward_exits(x)[0], module.model.eval()(x), atol=1e-4, rtol=1e-4
        )
    assert deployed.exit_macs((3, 32, 32))[0] == pytest.approx(_result(searched)["mmacs"] * 1e6)


def test_one_path_per_step_and_no_update_off_the_path(compose_cfg) -> None:
    """SGD with momentum and weight decay leaves every choice off the step's path untouched."""
    cfg = compose_cfg([*SPOS, "technique.optim.weight_decay=0.01"])
    datamodule, module = build_run(cfg)
    module.set_recipes({})
    module.start_phase(Phase("supernet"))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
    )
    from dynlab.data.sampling import ResumableLoaderCallback

    trainer.callbacks.append(ResumableLoaderCallback())
    trainer.fit(module, datamodule=datamodule)
    rng = np.random.default_rng(derived_seed(module.config.seed, PATH_STREAM, 0))
    path = module.sampler.sample(rng)
    net = module.model.net
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    for layer, chosen in enumerate(path):
        for block in range(4):
            names = {
                n
                for n, p in module.named_parameters()
                if any(p is q for q in net.layer_params(layer, block))
            }
            assert names, (layer, block)
            if block == chosen:
                assert names <= changed, (layer, block)
            else:
                assert not names & changed, (layer, block)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("technique.architecture=[0,1,2]", "expected 5 genes"),
        ("technique.architecture=[0,1,2,3,4]", "expected an int in 0..3"),
        ("technique.evolution.max_mmacs=0.01", "the space"),
        ("technique.evolution.min_mmacs=1000 technique.evolution.max_mmacs=null", "the space"),
        ("technique.evolution.min_mmacs=0.8 technique.evolution.max_mmacs=0.8", "window is empty"),
        ("technique.evolution.min_mmacs=0", "min_mmacs must be > 0"),
        ("backbone=cifar_resnet20", "cifar_spos_supernet"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(
    compose_cfg, override: str, message: str
) -> None:
    cfg = compose_cfg([*SPOS, *override.split()])
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)
        build_run(cfg)


def test_a_window_between_the_spaces_architectures_is_refused_naming_the_nearest(
    compose_cfg,
) -> None:
    """A window inside the space's span can still hold no architecture (MACs are discrete)."""
    table = MacsTable.measure(
        create_backbone("cifar_spos_supernet_tiny", num_classes=10), (3, 32, 32)
    )
    values = sorted({table.macs(g) for g in itertools.product(range(4), repeat=5)})
    a, b = max(itertools.pairwise(values), key=lambda p: p[1] - p[0])
    low, high = (a + (b - a) / 3) / 1e6, (b - (b - a) / 3) / 1e6
    window = [f"technique.evolution.min_mmacs={low}", f"technique.evolution.max_mmacs={high}"]
    cfg = compose_cfg([*SPOS, *window])
    with pytest.raises(
        ConfigError, match="no architecture of the space has its MACs inside"
    ) as err:
        build_run(cfg)
    assert f"{a / 1e6:.2f}" in str(err.value) and f"{b / 1e6:.2f}" in str(err.value)


def test_the_small_space_searches_with_channel_search_inside_a_20m_window(compose_cfg) -> None:
    """cifar_spos_supernet_small keeps its channel search unless the technique turns it off, and a
    window of 18-20 M (1x32x32 as Fashion-MNIST) gets the window sampler."""
    small = [
        *SPOS,
        "backbone=cifar_spos_supernet_small",
        "dataset=synthetic",
        "dataset.image_size=32",
        "dataset.channels=1",
        "technique.evolution.min_mmacs=18",
        "technique.evolution.max_mmacs=20",
    ]
    _, module = build_run(compose_cfg(small))
    assert module.space.num_scales and module.signature["channel_search"]
    assert module.window is not None and 0.05 < module.window.share < 0.15
    unbounded = ["technique.evolution.min_mmacs=null", "technique.evolution.max_mmacs=null"]
    _, blocks_only = build_run(compose_cfg([*small, *unbounded, "technique.channel_search=false"]))
    assert not blocks_only.space.num_scales and blocks_only.window is None


def test_a_search_of_a_given_architecture_is_refused_before_anything_runs(compose_cfg) -> None:
    cfg = compose_cfg([*SPOS, "technique.architecture=[0,1,2,3,0]"], config_name="search")
    with pytest.raises(ConfigError, match="nothing to search"):
        build_run(cfg)


@pytest.mark.slow
def test_a_supernet_checkpoint_of_another_space_is_refused(compose_cfg, searched: Path) -> None:
    supernet = searched / "checkpoints" / "supernet" / "final.ckpt"
    cfg = compose_cfg(
        [*SPOS, "technique.channel_search=true", f"ckpt_path={supernet}", "phase=evolution"],
        config_name="search",
    )
    with pytest.raises(ConfigError, match="channel_search"):
        build_run(cfg)


@pytest.mark.parametrize("preset", ["digits", "imagenet"])
def test_presets_compose_validate_and_their_macs_window_fits_the_space(compose_cfg, preset) -> None:
    cfg = compose_cfg([f"+experiment=spos/{preset}"])
    validate_config(cfg)
    assert cfg.technique.name == "spos" and cfg.expected.paper and cfg.expected.dynlab
    size = (3, 224, 224) if preset == "imagenet" else (3, 32, 32)
    net = create_backbone(cfg.backbone.name, num_classes=10, **cfg.backbone.kwargs)
    table = MacsTable.measure(net, size)
    evolution = EvolutionConfig(**cfg.technique.evolution)
    assert space_range_problem(table.minimum(), table.maximum(), evolution, "spos") is None
    # The limit binds: some architectures of the space lie above it.
    assert table.maximum() > evolution.max_mmacs * 1e6
