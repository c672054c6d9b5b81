"""The comparison across techniques (`make compare`): every technique's entry runs through the real
app under the shared budget, and the report puts each one on the chart, dynamic ones as curves,
static ones as points, measured against the static reference."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dynlab.apps.report import write_report
from dynlab.building import build_datamodule, build_module
from dynlab.checkpointing import load_static_weights
from dynlab.data.fake import write_fake_fashion_mnist
from dynlab.runner import run_job

from .conftest import REPO

ENTRIES = OmegaConf.load(REPO / "experiments/compare/digits.yaml").hydra.sweeper.params["+compare"]
ENTRIES = str(ENTRIES).split(",")
# Digits at the comparison's batch size, cut to a few batches a phase; the evaluation as in the
# comparison, on 3 budget levels.
TINY_COMPARE = [
    "+experiment=compare/digits",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=1",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "evaluation.qs=[0.5,1.0,2.0]",
]
# What an entry needs beyond the tiny budget: SPOS (and AngleNAS) a smaller evolution, RepVGG-A0 smaller
# batches, SFR one epoch per sparsification stage (3 for the tiny CondenseNetV2) in its first
# half, FBNetV2 no weights-only warm-up.
SMALLER = {
    "spos": [
        "technique.evolution.population=4",
        "technique.evolution.generations=1",
        "technique.evolution.mutations=1",
        "technique.evolution.crossovers=1",
    ],
    "repvgg": ["dataset.batch_size=16"],
    "sfr": ["trainer.max_epochs=6", "trainer.limit_train_batches=1"],
    "fbnetv2": ["technique.warmup_epochs=0"],  # its 1-epoch search would be all warm-up
    "metapruning": [
        "technique.evolution.population=4",
        "technique.evolution.generations=1",
        "technique.evolution.mutations=1",
        "technique.evolution.crossovers=1",
    ],
}
# The uniform baseline ignores the evolution; the same overrides leave the two runs differing by
# their entry alone, as `dynlab-report --versus` pairs them.
SMALLER["metapruning_uniform"] = SMALLER["metapruning"]
SMALLER["anglenas"] = SMALLER["spos"]


@pytest.mark.slow
def test_every_technique_lands_on_the_comparison_chart(compose_cfg, tmp_path: Path) -> None:
    assert set(ENTRIES) == {
        *("baseline", "repvgg", "s2dnas", "gfnet", "sfr", "spos", "anglenas", "fbnetv2"),
        *("metapruning", "metapruning_uniform"),
    }
    root = tmp_path / "compare"
    for entry in ENTRIES:
        run_dir = root / entry
        overrides = [*TINY_COMPARE, f"+compare={entry}", *SMALLER.get(entry, [])]
        cfg = compose_cfg(overrides, run_dir=run_dir)
        run_job(cfg)
        results = json.loads((run_dir / "results.json").read_text())
        assert results["status"] == "completed", entry
        assert sum(results["phase_seconds"].values()) > 0, entry
    write_report([root], tmp_path / "report", versus_override="compare=metapruning_uniform")
    with open(tmp_path / "report" / "comparison.csv", newline="") as f:
        rows = {row["technique"]: row for row in csv.DictReader(f)}
    charts = {label: row["chart"] for label, row in rows.items()}
    assert charts == {
        "baseline · cifar_resnet20": "point",
        "baseline · cifar_repvgg_a0": "point",
        "s2dnas · cifar_resnet20": "curve",
        "gfnet · cifar_resnet20": "curve",
        "sfr · cifar_condensenetv2_tiny": "point",
        "spos · cifar_spos_supernet_tiny": "point",
        "anglenas · cifar_spos_supernet_tiny": "point",
        "fbnetv2 · cifar_fbnetv2_supernet_tiny": "point",
        "metapruning · cifar_pruningnet_resnet20 · compare=metapruning": "point",
        "metapruning · cifar_pruningnet_resnet20 · compare=metapruning_uniform": "point",
    }
    assert [r["static_reference"] for r in rows.values()].count("True") == 1
    assert rows["baseline · cifar_resnet20"]["static_reference"] == "True"
    assert (tmp_path / "report" / "accuracy_vs_macs.png").stat().st_size > 10_000
    assert "(static reference)" in (tmp_path / "report" / "report.md").read_text()
    # MetaPruning set against its uniform baseline under the same 20 M MACs, no other entry
    with open(tmp_path / "report" / "versus.csv", newline="") as f:
        (versus,) = csv.DictReader(f)
    assert versus["entry"].endswith("compare=metapruning") and versus["low"]
    assert 18e6 <= float(versus["macs"]) <= 20e6 and 19e6 < float(versus["against_macs"]) <= 20e6


@pytest.mark.slow
def test_fashion_mnist_stages_hand_the_static_resnet20_to_s2dnas_and_gfnet(
    compose_cfg, tmp_path: Path
) -> None:
    # The two stages of `make compare` into one sweep dir (<dir>/<entry>/seed<seed>, as the
    # preset's hydra.sweep.subdir), on tiny Fashion-MNIST files.
    data = write_fake_fashion_mnist(tmp_path / "data", num_train=160, num_test=40)
    tiny = [
        "+experiment=compare/fashion_mnist",
        f"dataset.root={data}",
        "dataset.train_subset=64",
        "dataset.val_size=32",
        "dataset.batch_size=32",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        "evaluation.qs=[0.5,1.0,2.0]",
    ]
    sweep = tmp_path / "sweep"
    static = compose_cfg([*tiny, "+compare=baseline"], run_dir=sweep / "baseline" / "seed0")
    run_job(static)
    trained = load_static_weights(sweep / "baseline/seed0/checkpoints/train/final.ckpt")
    for entry in ("s2dnas_from_static", "gfnet_from_static"):
        run_dir = sweep / entry / "seed0"
        run_dir.mkdir(parents=True)  # as Hydra makes it before the job starts
        cfg = compose_cfg([*tiny, f"+compare={entry}"], run_dir=run_dir)
        init = Path(cfg.technique.init_from).resolve()
        assert init == (sweep / "baseline/seed0/checkpoints/train/final.ckpt").resolve()
        if entry == "s2dnas_from_static":  # the transformed network starts from those weights
            module = build_module(cfg, build_datamodule(cfg))
            assert module.static_weights is not None
            stem = next(k for k in trained if k.startswith("stem.0"))
            assert torch.equal(module.static_weights[stem], trained[stem])
        run_job(cfg)
        assert json.loads((sweep / entry / "seed0/results.json").read_text())["status"] == (
            "completed"
        )
