"""Budgeted-batch evaluation speed: calibration + test evaluation, vectorised vs per-sample loop.

50,000 val and 50,000 test samples x 10 exits x 39 budget levels (MSDNet's) x 100 classes on CPU,
both implementations timed side by side in one run on the same data. Prints one JSON object.
Run: `.venv/bin/python benchmarks/budgeted.py [--threads N]` (default 1 thread: on a shared
machine, more torch threads than idle cores make timings swing wildly).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch import Tensor

from dynlab.evaluation.budgeted import DEFAULT_QS, budgeted_curve
from dynlab.evaluation.reference import budgeted_curve_loop

NUM_SAMPLES, NUM_EXITS, NUM_CLASSES = 50_000, 10, 100


def synthetic_split(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Softmax outputs [K,n,C] that grow more confident at later exits, and random targets [n]."""
    sharpness = torch.linspace(1.0, 4.0, NUM_EXITS).view(-1, 1, 1)
    logits = torch.randn(NUM_EXITS, n, NUM_CLASSES, generator=generator) * sharpness
    return logits.softmax(dim=-1), torch.randint(0, NUM_CLASSES, (n,), generator=generator)


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Best wall-clock time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    torch.set_num_threads(parser.parse_args().threads)
    generator = torch.Generator().manual_seed(0)
    val, test = synthetic_split(NUM_SAMPLES, generator), synthetic_split(NUM_SAMPLES, generator)
    exit_macs = [float(k + 1) * 1e7 for k in range(NUM_EXITS)]
    vectorised = best_seconds(lambda: budgeted_curve(*val, *test, exit_macs), repeats=5)
    loop = best_seconds(lambda: budgeted_curve_loop(*val, *test, exit_macs), repeats=1)
    same = budgeted_curve(*val, *test, exit_macs) == budgeted_curve_loop(*val, *test, exit_macs)
    print(
        json.dumps(
            {
                "samples_per_split": NUM_SAMPLES,
                "exits": NUM_EXITS,
                "classes": NUM_CLASSES,
                "budgets": len(DEFAULT_QS),
                "torch_threads": torch.get_num_threads(),
                "budgeted_curve_s": round(vectorised, 4),
                "budgeted_curve_loop_s": round(loop, 3),
                "speedup_vs_loop": round(loop / vectorised, 1),
                "identical_records": same,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
