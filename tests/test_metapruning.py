"""MetaPruning end to end on digits: the PruningNet (generated weights, BN banks) equals the pruned
network it becomes, the official spaces have the official shapes, the search stays inside its MACs
window and its winner retrains; bad input is refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch

from dynlab.backbones import create_backbone
from dynlab.backbones.metapruning import SCALES, PruningNet
from dynlab.backbones.metapruning.space import mobilenetv2_space
from dynlab.evaluation.macs import count_macs
from dynlab.results import read_results
from dynlab.runner import run_job
from dynlab.search import RESULT, SupernetExits
from dynlab.search.ledger import RECORDS
from dynlab.validation import ConfigError, build_run, validate_config

from .conftest import search_once

# CIFAR ResNet-8's PruningNet on digits: a short PruningNet phase and a small evolution whose
# MACs limit (MAX_MMACS) keeps out the dearest configurations (the full net: 12.8 M).
MAX_MMACS = 4.0
METAPRUNING = [
    "technique=metapruning",
    "backbone=cifar_pruningnet_resnet8",
    "dataset=digits",
    "dataset.batch_size=64",
    "technique.optim.lr=0.1",
    "technique.optim.schedule=cosine",
    "technique.evolution.population=6",
    "technique.evolution.generations=2",
    "technique.evolution.parents=3",
    "technique.evolution.mutations=2",
    "technique.evolution.crossovers=2",
    "technique.evolution.recalibration_batches=4",
    "technique.evolution.recalibration_batch_size=64",
    "technique.evolution.val_images=200",
    f"technique.evolution.max_mmacs={MAX_MMACS}",
    "trainer.max_epochs=12",
    "trainer.enable_progress_bar=false",
    "evaluation.budgeted=false",
    "logger=csv",
]


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dynlab-search run (PruningNet, evolution) shared by the tests below."""
    return search_once(tmp_path_factory, "metapruning", METAPRUNING)


def _result(run: Path) -> dict[str, Any]:
    return json.loads((run / "checkpoints" / "evolution" / RESULT).read_text())


def _small_mobilenetv2(num_classes: int) -> PruningNet:
    """A MobileNetV2 space small enough for a test: stem 16, stages 16 (t=1) and 24 (t=6, two
    blocks, the second with its residual), last conv 32."""
    space = mobilenetv2_space(16, (16, 24), (1, 2), (1, 2), (1, 6), 1, 32)
    return PruningNet(space, num_classes)


@pytest.mark.parametrize(
    "build",
    [
        lambda: create_backbone("cifar_pruningnet_resnet8", num_classes=10),
        lambda: create_backbone("cifar_pruningnet_resnet20", num_classes=10),
        lambda: _small_mobilenetv2(10),
    ],
    ids=["resnet8", "resnet20", "mobilenetv2"],
)
def test_the_pruned_network_computes_what_the_pruningnet_does_at_its_configuration(
    build: Any,
) -> None:
    """After a few training steps on random configurations (BN statistics of several scales),
    the child of a configuration, a plain network carrying the generated weights, gives the
    PruningNet's logits at that configuration, and has the widths the grid gives."""
    torch.manual_seed(0)
    net: PruningNet = build()
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        genes = torch.randint(0, len(SCALES), (net.space.num_genes,), generator=generator)
        net.set_path(genes.tolist())
        net.train()(torch.randn(8, 3, 32, 32))
    net.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.child(genes.tolist()).eval()(x), net(x))
    plan = net.plan(genes.tolist())
    block = net.space.blocks[1]
    assert plan["blocks"][1][1] == int(block.base_mid * SCALES[int(genes[block.mid_gene])])


def test_the_official_resnet50_space_prunes_what_the_official_code_prunes() -> None:
    """Its full configuration is ResNet-50 itself (timm's resnet50: same parameters and MACs);
    the last stage's 2048 outputs carry no gene; its genes are the stem, 3 stage outputs and 16
    hidden widths (official: 20); the smallest configuration keeps a tenth of each width."""
    with torch.device("meta"):
        net: PruningNet = create_backbone("pruningnet_resnet50", num_classes=1000)
        full = net.standalone([len(SCALES) - 1] * net.space.num_genes)
        reference = timm.create_model("resnet50", num_classes=1000)
    assert net.space.num_genes == 20 and net.space.stage_genes == 4
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(full) == params(reference)
    assert count_macs(full, (3, 224, 224)) == count_macs(reference, (3, 224, 224))
    assert net.plan([0] * 20)["blocks"][-1] == [2048, 51, 2048]  # int(512 * 0.1) hidden


def test_a_scale_grid_that_leaves_zero_channels_is_refused(compose_cfg) -> None:
    cfg = compose_cfg([*METAPRUNING, "technique.scales=[0.05,0.5,1.0]"])
    with pytest.raises(ConfigError, match=r"the scale 0.05 leaves the stem \(16 channels\) with 0"):
        validate_config(cfg)
        build_run(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("technique.architecture=[0,1,2]", "3 genes for a space of 6"),
        ("technique.architecture=[0,1,2,3,4,31]", r"scale ids \[31\] outside 0..30"),
        ("technique.evolution.max_mmacs=0.01", "holds no architecture"),
        ("backbone=cifar_resnet20", "cifar_pruningnet_resnet8"),
        ("technique.uniform_mmacs=0.001", "no uniform width costs at most 0.001 M MACs"),
        ("technique.uniform_mmacs=-1", "technique.uniform_mmacs must be > 0"),
        ("technique.uniform_mmacs=2 technique.architecture=[0,0,0,0,0,0]", "not both"),
        ("technique.evolution.max_latency_ms=5", "no latency table for PruningNet spaces"),
        ("technique.random_band=0", "technique.random_band must be >= 1"),
        ("technique.random_band=4 technique.evolution.max_mmacs=null", "set that limit"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(
    compose_cfg, override: str, message: str
) -> None:
    cfg = compose_cfg([*METAPRUNING, *override.split()])
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)
        build_run(cfg)


def test_the_uniform_baseline_is_the_widest_uniform_width_inside_a_budget(compose_cfg) -> None:
    _, module = build_run(compose_cfg(METAPRUNING))
    genes = module.uniform(4.0)
    assert len(set(genes)) == 1 and module.macs_of(genes) <= 4.0e6
    wider = (genes[0] + 1,) * len(genes)
    assert module.macs_of(wider) > 4.0e6
    with pytest.raises(ValueError, match="no uniform width costs at most 0.001 M MACs"):
        module.uniform(0.001)
    # technique.uniform_mmacs retrains that configuration alone, as a plain network.
    _, baseline = build_run(compose_cfg([*METAPRUNING, "technique.uniform_mmacs=4"]))
    assert baseline.architecture == genes and [p.name for p in baseline.phases("train")] == [
        "retrain"
    ]
    assert count_macs(baseline.model, (3, 32, 32)) == module.macs_of(genes)


def test_random_candidates_come_from_a_band_around_the_limits_uniform_width(compose_cfg) -> None:
    """technique.random_band: every gene uniform over that many ids holding the uniform width of
    the window's upper limit; a band wider than the grid is the grid."""
    _, module = build_run(compose_cfg([*METAPRUNING, "technique.random_band=4"]))
    low, high = module._random_ids
    assert high - low == 3 and low <= module.uniform(MAX_MMACS)[0] <= high
    draws = [module._draw_in_band(np.random.default_rng(seed)) for seed in range(30)]
    assert {g for d in draws for g in d} == set(range(low, high + 1))
    _, wide = build_run(compose_cfg([*METAPRUNING, "technique.random_band=40"]))
    assert wide._random_ids == [0, len(SCALES) - 1]


def test_one_configuration_per_step_from_the_seed_and_step(compose_cfg) -> None:
    """Every step's configuration is uniform over the grid and depends on (seed, step) only."""
    _, module = build_run(compose_cfg(METAPRUNING))
    draws = [module._draw(s) for s in range(200)]
    assert draws[3] == module._draw(3) and len(set(draws)) == 200
    flat = [g for d in draws for g in d]
    assert min(flat) == 0 and max(flat) == len(SCALES) - 1


@pytest.mark.slow
def test_search_finds_a_configuration_within_the_limit_and_its_deploy_form_is_it(
    compose_cfg, searched: Path
) -> None:
    result = _result(searched)
    records = json.loads((searched / "checkpoints" / "evolution" / RECORDS).read_text())
    assert result["search"] == "metapruning" and len(result["architecture"]) == 6
    assert result["mmacs"] <= MAX_MMACS and all(r["macs"] <= MAX_MMACS * 1e6 for r in records)
    genes = [tuple(r["genes"]) for r in records]
    assert len(genes) == len(set(genes))
    assert result["supernet_val_top1"] == max(r["top1"] for r in records)
    # The PruningNet already separates the digits at its best configuration (chance: 10 %).
    assert result["supernet_val_top1"] > 40.0
    results = read_results(searched)
    assert results["search"]["widths"]["stem"] >= 1
    assert results["exit_macs"][0] == pytest.approx(result["mmacs"] * 1e6)
    cfg = compose_cfg(
        [*METAPRUNING, f"ckpt_path={searched / 'checkpoints' / 'evolution' / 'final.ckpt'}"]
    )
    _, module = build_run(cfg)
    from dynlab.checkpointing import load_module_state

    load_module_state(module, cfg.ckpt_path)
    assert isinstance(module.model, SupernetExits)
    assert list(module.model.net.active()) == result["architecture"]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            module.deploy().forward_exits(x)[0], module.model.eval()(x), atol=1e-4, rtol=1e-4
        )


@pytest.mark.slow
def test_the_winner_retrained_from_the_search_output_learns(compose_cfg, searched: Path) -> None:
    result = searched / "checkpoints" / "evolution" / RESULT
    cfg = compose_cfg(
        [*METAPRUNING, f"technique.architecture_file={result}", "trainer.max_epochs=6"]
    )
    run_job(cfg)
    results = read_results(Path(cfg.run_dir))
    assert results["metrics"]["test/top1"] > 80.0  # chance: 10 %
    assert results["exit_macs"][0] == pytest.approx(_result(searched)["mmacs"] * 1e6, abs=0.5)


@pytest.mark.slow
def test_a_pruningnet_checkpoint_of_another_space_is_refused(compose_cfg, searched: Path) -> None:
    pruningnet = searched / "checkpoints" / "pruningnet" / "final.ckpt"
    other = "technique.scales=[0.25,0.5,0.75,1.0]"
    cfg = compose_cfg(
        [*METAPRUNING, other, f"ckpt_path={pruningnet}", "phase=evolution"], config_name="search"
    )
    with pytest.raises(ConfigError, match="scales"):
        build_run(cfg)


@pytest.mark.parametrize("preset", ["digits", "imagenet_mobilenetv2", "imagenet_resnet50"])
def test_presets_compose_and_validate(compose_cfg, preset: str) -> None:
    cfg = compose_cfg([f"+experiment=metapruning/{preset}"])
    validate_config(cfg)
    assert cfg.technique.name == "metapruning" and cfg.expected.paper and cfg.expected.dynlab
    if preset == "digits":  # the ImageNet PruningNets hold 242 M and 776 M parameters
        _, module = build_run(cfg)
        assert module.macs_of([0] * 6) < cfg.technique.evolution.max_mmacs * 1e6
