"""One search of each technique under a latency budget, and the measured latency of what it found.

For SPOS (evolution with `max_latency_ms`) and FBNetV2 (`cost=latency` with `target_ms`) on their
tiny spaces, digits at 32x32, seed 0: the space's latency table is built first (in a fresh
`DYNLAB_CACHE` that the search then reads, so both use one table), the budget is put at
`--place` of the way from the space's fastest to its slowest predicted architecture, one
`dynlab-search` runs under it, and the architecture it returns is built as a standalone deploy
form and timed whole at batch 1 (1 thread). Reported per technique: the budget, the table's
prediction and the measured ms of the result, and the space's predicted span. Prints one JSON
object.
Run: .venv/bin/python benchmarks/latency_search.py [--place 0.3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dynlab.backbones import create_backbone
from dynlab.evaluation.latency import machine, torch_threads
from dynlab.protocol import StaticExits
from dynlab.search.latency_table import TimingConfig, time_module
from dynlab.techniques.fbnetv2.latency import FBNetV2Latency
from dynlab.techniques.spos.latency import SPOSLatency

SIZE = (3, 32, 32)  # digits as the CIFAR-style spaces take it
COMMON = [
    "dataset=digits",
    "dataset.batch_size=64",
    "trainer.enable_progress_bar=false",
    "evaluation.budgeted=false",
    "evaluation.anytime=false",
    "logger=none",
    "seed=0",
]
SPOS = [
    "technique=spos",
    "backbone=cifar_spos_supernet_tiny",
    "technique.optim.lr=0.1",
    "trainer.max_epochs=20",
    "technique.evolution.population=8",
    "technique.evolution.generations=4",
    "technique.evolution.parents=3",
    "technique.evolution.mutations=3",
    "technique.evolution.crossovers=3",
    "technique.evolution.recalibration_batches=8",
    "technique.evolution.recalibration_batch_size=64",
    "technique.evolution.val_images=null",
]
FBNETV2 = [
    "technique=fbnetv2",
    "backbone=cifar_fbnetv2_supernet_tiny",
    "technique.cost=latency",
    "technique.warmup_epochs=2",
    "technique.temperature=2.0",
    "technique.phases.search.epochs=8",
    "trainer.max_epochs=8",
    "trainer.limit_train_batches=10",
]


def search(overrides: list[str], run_dir: Path, phase: str) -> dict[str, Any]:
    app = Path(sys.executable).with_name("dynlab-search")
    args = [*overrides, *COMMON, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "DYNLAB_LATENCY": "false", "WANDB_MODE": "offline"}
    subprocess.run([str(app), *args], check=True, env=env, capture_output=True, text=True)
    return json.loads((run_dir / "checkpoints" / phase / "search_result.json").read_text())


def measured_ms(net: torch.nn.Module, timing: TimingConfig) -> float:
    """The deploy form of `net` timed whole: the mean of two passes."""
    deployed = StaticExits(net.eval()).deploy()
    with torch_threads(timing.threads):
        return statistics.fmean(
            statistics.fmean(time_module(deployed, SIZE, timing)) for _ in range(2)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--place", type=float, default=0.3)
    args = parser.parse_args()
    timing = TimingConfig(threads=1)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "place": args.place,
    }
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DYNLAB_CACHE"] = str(Path(tmp) / "cache")
        torch.manual_seed(0)
        spos_net = create_backbone("cifar_spos_supernet_tiny", num_classes=10).eval()
        spos_latency = SPOSLatency.build(spos_net, SIZE, timing)
        fast, slow = spos_latency.span()
        budget = fast + args.place * (slow - fast)
        start = time.perf_counter()
        result = search(
            [*SPOS, f"technique.evolution.max_latency_ms={budget:.4f}"],
            Path(tmp) / "spos",
            "evolution",
        )
        genes = tuple(result["architecture"])
        report["spos"] = {
            "space_span_ms": [round(fast, 3), round(slow, 3)],
            "budget_ms": round(budget, 3),
            "predicted_ms": round(result["predicted_ms"], 3),
            "measured_ms": round(measured_ms(spos_net.child(genes), timing), 3),
            "supernet_val_top1": result["supernet_val_top1"],
            "architecture": list(genes),
            "search_s": round(time.perf_counter() - start, 1),
        }
        torch.manual_seed(0)
        fb_net = create_backbone("cifar_fbnetv2_supernet_tiny", num_classes=10).eval()
        fb_latency = FBNetV2Latency.build(fb_net, SIZE, timing)
        fast, slow = fb_latency.span()
        budget = fast + args.place * (slow - fast)
        start = time.perf_counter()
        result = search([*FBNETV2, f"technique.target_ms={budget:.4f}"], Path(tmp) / "fb", "search")
        choices = result["architecture"]
        report["fbnetv2"] = {
            "space_span_ms": [round(fast, 3), round(slow, 3)],
            "target_ms": round(budget, 3),
            "predicted_ms": round(result["predicted_ms"], 3),
            "softmax_expected_ms": round(result["expected_ms"], 3),
            "measured_ms": round(measured_ms(fb_net.standalone(choices), timing), 3),
            "architecture": choices,
            "search_s": round(time.perf_counter() - start, 1),
        }
        tables = sorted(p.name for p in Path(os.environ["DYNLAB_CACHE"]).rglob("*.json"))
        report["tables"] = tables  # one per space: the searches read the benchmark's
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
