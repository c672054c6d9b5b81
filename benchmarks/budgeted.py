"""Budgeted-batch evaluation speed: calibration + test evaluation, vectorised vs per-sample loop.

50,000 val and 50,000 test samples x 10 exits x 39 budget levels (MSDNet's) on CPU. The loop is
timed on a subset and scaled per sample, since its cost grows linearly in N (labelled as such).
Prints one JSON object. Run: `.venv/bin/python benchmarks/budgeted.py`.
"""

from __future__ import annotations

import json
import time

import torch

from dynlab.evaluation.budgeted import DEFAULT_QS, budgeted_curve
from dynlab.evaluation.reference import budgeted_curve_loop

NUM_SAMPLES, NUM_EXITS, NUM_CLASSES = 50_000, 10, 100
LOOP_SUBSET = 5_000


def synthetic_split(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax outputs [K,n,C] that grow more confident at later exits, and random targets [n]."""
    sharpness = torch.linspace(1.0, 4.0, NUM_EXITS).view(-1, 1, 1)
    logits = torch.randn(NUM_EXITS, n, NUM_CLASSES, generator=generator) * sharpness
    return logits.softmax(dim=-1), torch.randint(0, NUM_CLASSES, (n,), generator=generator)


def seconds(fn, *args) -> float:
    """Best wall-clock time of three calls."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    val, test = synthetic_split(NUM_SAMPLES, generator), synthetic_split(NUM_SAMPLES, generator)
    exit_macs = [float(k + 1) * 1e7 for k in range(NUM_EXITS)]
    vectorised = seconds(budgeted_curve, *val, *test, exit_macs)

    def subset(split: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return split[0][:, :LOOP_SUBSET].contiguous(), split[1][:LOOP_SUBSET]

    start = time.perf_counter()
    budgeted_curve_loop(*subset(val), *subset(test), exit_macs)
    loop_subset = time.perf_counter() - start
    loop_estimate = loop_subset * NUM_SAMPLES / LOOP_SUBSET
    print(
        json.dumps(
            {
                "samples_per_split": NUM_SAMPLES,
                "exits": NUM_EXITS,
                "classes": NUM_CLASSES,
                "budgets": len(DEFAULT_QS),
                "torch_threads": torch.get_num_threads(),
                "budgeted_curve_s": round(vectorised, 4),
                "loop_subset_samples": LOOP_SUBSET,
                "loop_subset_s": round(loop_subset, 3),
                "loop_full_s_estimate_scaled_per_sample": round(loop_estimate, 2),
                "speedup_vs_loop_estimate": round(loop_estimate / vectorised, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
