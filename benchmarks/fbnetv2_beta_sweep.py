"""Does FBNetV2's searched cost move monotonically with beta? A sweep of the cost exponent of the
architecture loss CE * alpha * (cost / cost of the cheapest architecture)^beta, the cost MACs or
(`--cost latency`) milliseconds on this machine's latency table.

For each space (the tiny and the CIFAR DMaskingNAS spaces, on scikit-learn's digits at 32x32) and
each beta, one short `dynlab-search` (the same seed, data and schedule, only beta differs) and the
searched (argmax) network's cost, with the expected cost of the search's final softmax (M MACs, or
the table's predicted ms). Reported per space: both lists by increasing beta and whether each is
non-increasing (`monotonic`). Prints one JSON object.
Run: .venv/bin/python benchmarks/fbnetv2_beta_sweep.py [--betas 0.05 0.3 1 3 8] [--epochs 6]
     [--spaces cifar_fbnetv2_supernet_tiny] [--cost macs|latency]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

SPACES = ("cifar_fbnetv2_supernet_tiny", "cifar_fbnetv2_supernet")


# What the search result calls the argmax network's cost and the softmax's expected cost.
RESULT_KEYS = {"macs": ("mmacs", "expected_mmacs"), "latency": ("predicted_ms", "expected_ms")}


def search(
    space: str, beta: float, epochs: int, batches: int, cost: str, run_dir: Path
) -> dict[str, float]:
    """One search; the searched network's cost and the softmax's expected cost."""
    app = Path(sys.executable).with_name("dynlab-search")
    overrides = [
        "technique=fbnetv2",
        f"technique.cost={cost}",
        f"backbone={space}",
        "dataset=digits",
        "dataset.batch_size=64",
        f"technique.beta={beta}",
        "technique.warmup_epochs=1",
        "technique.temperature=2.0",
        f"technique.phases.search.epochs={epochs}",
        f"trainer.max_epochs={epochs}",
        f"trainer.limit_train_batches={batches}",
        "trainer.enable_progress_bar=false",
        "evaluation.budgeted=false",
        "evaluation.anytime=false",
        "logger=none",
        "seed=0",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "DYNLAB_LATENCY": "false", "WANDB_MODE": "offline"}
    subprocess.run([str(app), *overrides], check=True, env=env, capture_output=True, text=True)
    result = json.loads((run_dir / "checkpoints" / "search" / "search_result.json").read_text())
    searched, expected = RESULT_KEYS[cost]
    return {"searched": result[searched], "expected": result[expected]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.05, 0.3, 1.0, 3.0, 8.0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--spaces", nargs="+", default=list(SPACES), choices=SPACES)
    parser.add_argument("--cost", default="macs", choices=sorted(RESULT_KEYS))
    args = parser.parse_args()
    start = time.perf_counter()
    spaces = {}
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["DYNLAB_CACHE"] = str(Path(scratch) / "cache")  # one table for the sweep
        for space in args.spaces:
            runs = [
                search(
                    space, b, args.epochs, args.batches, args.cost, Path(scratch) / f"{space}-{b}"
                )
                for b in args.betas
            ]
            searched = [round(r["searched"], 4) for r in runs]
            expected = [round(r["expected"], 4) for r in runs]
            unit = RESULT_KEYS[args.cost][0]
            spaces[space] = {
                f"searched_{unit}": searched,
                f"expected_{unit}": expected,
                "monotonic": {
                    "searched": all(a >= b for a, b in pairwise(searched)),
                    "expected": all(a >= b for a, b in pairwise(expected)),
                },
            }
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "betas": args.betas,
        "cost": args.cost,
        "schedule": {"epochs": args.epochs, "batches_per_epoch": args.batches, "warmup_epochs": 1},
        "spaces": spaces,
        "seconds": round(time.perf_counter() - start),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
