"""The comparison across techniques (`make compare`): every technique's entry runs through the real
app under the shared budget, and the report puts each one on the chart, dynamic ones as curves,
static ones as points, measured against the static reference."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dynlab.apps.report import write_report
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
# What an entry needs beyond the tiny budget: SPOS a smaller evolution, RepVGG-A0 smaller
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
}


@pytest.mark.slow
def test_every_technique_lands_on_the_comparison_chart(compose_cfg, tmp_path: Path) -> None:
    assert set(ENTRIES) == {"baseline", "repvgg", "s2dnas", "gfnet", "sfr", "spos", "fbnetv2"}
    root = tmp_path / "compare"
    for entry in ENTRIES:
        run_dir = root / entry
        overrides = [*TINY_COMPARE, f"+compare={entry}", *SMALLER.get(entry, [])]
        cfg = compose_cfg(overrides, run_dir=run_dir)
        run_job(cfg)
        results = json.loads((run_dir / "results.json").read_text())
        assert results["status"] == "completed", entry
        assert sum(results["phase_seconds"].values()) > 0, entry
    write_report([root], tmp_path / "report")
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
        "fbnetv2 · cifar_fbnetv2_supernet_tiny": "point",
    }
    assert [r["static_reference"] for r in rows.values()].count("True") == 1
    assert rows["baseline · cifar_resnet20"]["static_reference"] == "True"
    assert (tmp_path / "report" / "accuracy_vs_macs.png").stat().st_size > 10_000
    assert "(static reference)" in (tmp_path / "report" / "report.md").read_text()
