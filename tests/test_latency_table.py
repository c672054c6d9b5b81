"""Latency tables (dynlab.search.latency_table, techniques/spos/latency.py): an SPOS space's table
holds one timed entry per op shape, a candidate's prediction is the sum of its ops, tables are
cached per device and thread count, and SPOS's evolution keeps to a time window on them. How well
the tables predict whole networks is measured in benchmarks/latency_table.py, not here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dynlab.backbones import create_backbone
from dynlab.backbones.spos_shufflenetv2 import BLOCKS, MacsTable
from dynlab.search import latency_table
from dynlab.search.driver import SearchDriver
from dynlab.search.evolution import Evolution
from dynlab.search.latency_table import TimingConfig
from dynlab.techniques.spos.latency import SPOSLatency
from dynlab.techniques.supernet_config import EvolutionConfig
from dynlab.validation import ConfigError, build_run

QUICK = TimingConfig(threads=1, warmup=1, rounds=3, calls=1)
SIZE = (3, 32, 32)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DYNLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_an_spos_table_times_each_op_shape_once_and_predicts_the_sum(cache: Path) -> None:
    net = create_backbone("cifar_spos_supernet_tiny", num_classes=10)
    latency = SPOSLatency.build(net, SIZE, QUICK)
    entries = latency.table.entries
    used = {k for layer in latency.keys for blocks in layer for k in blocks} | set(latency.fixed)
    assert used == set(entries)  # every entry is some op of the space, each timed once
    assert len(latency.keys) == net.space.num_layers
    assert all(len(layer) == len(BLOCKS) for layer in latency.keys)
    # Layers of the same shapes share their entries: the CIFAR space's 20 layers (4, 4, 8, 4 a
    # stage) have 3 of one shape per stage after its first.
    cifar = SPOSLatency.build(create_backbone("cifar_spos_supernet", num_classes=10), SIZE, QUICK)
    assert len(cifar.table.entries) == len(cifar.fixed) + 4 * 2 * len(BLOCKS)
    for entry in entries.values():
        assert entry["count"] == QUICK.rounds and entry["mean"] > 0 and entry["std"] >= 0
    genes = (3, 0, 1, 2, 0)
    chosen = [latency.keys[i][b][0] for i, b in enumerate(genes)]
    expected = sum(entries[k]["mean"] for k in [*latency.fixed, *chosen])
    scale = latency.table.calibration["scale"]  # measured / summed on whole reference networks
    assert latency.ms(genes, net.space) == pytest.approx(expected * scale) and 0.5 < scale < 3
    fastest, slowest = latency.span()
    assert fastest <= latency.ms(genes, net.space) <= slowest
    assert latency.table.device["timing"]["threads"] == 1 and latency.table.device["cpu"]


def test_tables_are_cached_per_device_and_thread_count(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = create_backbone("cifar_spos_supernet_tiny", num_classes=10)
    first = SPOSLatency.build(net, SIZE, QUICK)
    (path,) = cache.rglob("spos-*.json")
    assert path.parent.name == "torch-1t"

    def no_timing(*_: Any) -> None:
        pytest.fail("a cached table was timed again")

    monkeypatch.setattr(latency_table, "time_ops", no_timing)
    assert SPOSLatency.build(net, SIZE, QUICK).table.entries == first.table.entries
    monkeypatch.undo()
    monkeypatch.setenv("DYNLAB_CACHE", str(cache))
    SPOSLatency.build(net, SIZE, TimingConfig(threads=2, warmup=1, rounds=3, calls=1))
    assert sorted(p.parent.name for p in cache.rglob("spos-*.json")) == ["torch-1t", "torch-2t"]
    other = create_backbone("cifar_spos_supernet_tiny", num_classes=3)
    SPOSLatency.build(other, SIZE, QUICK)  # another space: another table
    assert len(list(cache.rglob("torch-1t/spos-*.json"))) == 2


def test_the_evolution_scores_only_candidates_inside_both_windows(tmp_path: Path) -> None:
    net = create_backbone("cifar_spos_supernet_tiny", num_classes=10)
    table = MacsTable.measure(net, SIZE)
    # A made-up latency that disagrees with MACs: the windows must both bind.
    latency = lambda genes: 1.0 + 0.5 * genes[0] + 0.1 * sum(genes)  # noqa: E731
    cfg = EvolutionConfig(
        population=8,
        generations=3,
        parents=3,
        mutations=3,
        crossovers=3,
        max_mmacs=table.maximum() / 1e6 * 0.95,
        min_latency_ms=1.5,
        max_latency_ms=2.6,
    )
    evolution = Evolution(
        net.space.gene_choices(),
        table.macs,
        lambda g: {"top1": float(sum(g))},
        cfg,
        latency_of=latency,
    )
    outcome = SearchDriver(evolution, tmp_path, seed=0).run()
    assert len(outcome.records) > 8
    for r in outcome.records:
        assert r["latency_ms"] == latency(tuple(r["genes"])) and 1.5 <= r["latency_ms"] <= 2.6
        assert r["macs"] <= cfg.max_mmacs * 1e6
    assert outcome.result["predicted_ms"] == latency(tuple(outcome.result["architecture"]))
    assert any(h["outside"] for h in evolution.history)  # the window refused some draws


def test_a_time_window_outside_the_space_is_refused_before_anything_trains(
    compose_cfg, cache: Path
) -> None:
    base = ["technique=spos", "backbone=cifar_spos_supernet_tiny", "dataset=digits"]
    cfg = compose_cfg([*base, "technique.evolution.max_latency_ms=0.001"], config_name="search")
    with pytest.raises(ConfigError, match=r"time window \[min_latency_ms=None, max_latency_ms="):
        build_run(cfg)
    with pytest.raises(ConfigError, match="time window is empty"):
        build_run(
            compose_cfg(
                [
                    *base,
                    "technique.evolution.min_latency_ms=2",
                    "technique.evolution.max_latency_ms=1",
                ]
            )
        )
    _, module = build_run(compose_cfg([*base, "technique.evolution.max_latency_ms=1000"]))
    assert np.isfinite(module._latency.span()).all()


def test_the_timed_ops_are_deploy_forms_with_batchnorm_folded(cache: Path) -> None:
    """As the whole net's deploy form: no BatchNorm left in any op of the table."""
    from torch import nn

    from dynlab.search.latency_table import deploy_op
    from dynlab.techniques.spos.latency import _ops

    net = create_backbone("cifar_spos_supernet_tiny", num_classes=10)
    ops, _, _ = _ops(net.config, SIZE)
    assert ops and all(
        not any(isinstance(m, nn.BatchNorm2d) for m in deploy_op(module).modules())
        for module, _ in ops.values()
    )


def _build_counting(cache_dir: str, marks: str) -> None:
    """Build one small table, appending a line to `marks` each time its ops are timed."""
    import os
    import time

    from torch import nn

    os.environ["DYNLAB_CACHE"] = cache_dir

    def ops() -> dict[str, Any]:
        with open(marks, "a") as f:
            f.write("timed\n")
        time.sleep(0.5)  # the other process arrives while this one builds
        return {"conv": (nn.Conv2d(3, 8, 3), (3, 8, 8))}

    latency_table.cached_table("locked", {"space": 1}, ops, QUICK)


def test_processes_that_need_one_table_time_it_once(tmp_path: Path) -> None:
    """Two processes (as DDP ranks) asking for the same uncached table: one times it, the other
    waits on the lock and reads it."""
    import multiprocessing

    marks = tmp_path / "marks"
    context = multiprocessing.get_context("fork")
    procs = [
        context.Process(target=_build_counting, args=(str(tmp_path / "cache"), str(marks)))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert marks.read_text() == "timed\n"
    assert len(list((tmp_path / "cache").rglob("locked-*.json"))) == 1
