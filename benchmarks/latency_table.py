"""How well an SPOS space's latency table predicts whole networks on this CPU.

For each space: the table is built (timed; `DYNLAB_CACHE` is pointed at a fresh folder so nothing
cached is reused), then `--archs` random architectures (every gene uniform) are built as
standalone deploy forms and timed whole at batch 1, twice, the two passes interleaved architecture
by architecture (A and B). Reported: the median relative error |predicted / A - 1| and Spearman's
rank correlation of predicted against A, next to the noise floor, the same two figures of B
against A (how far two measurements of the same networks agree). Targets: median error <= 10 % and
rank correlation >= 0.9. Prints one JSON object.
Run: .venv/bin/python benchmarks/latency_table.py [--archs 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from dynlab.backbones import create_backbone
from dynlab.evaluation.latency import machine, torch_threads
from dynlab.protocol import StaticExits
from dynlab.search.latency_table import TimingConfig, time_module
from dynlab.techniques.spos.latency import SPOSLatency

# (backbone, input size, backbone kwargs): the tiny space, the small one with channel search (as
# Fashion-MNIST is searched), the CIFAR one.
SPACES = [
    ("cifar_spos_supernet_tiny", (3, 32, 32), {}),
    ("cifar_spos_supernet_small", (1, 32, 32), {}),
    ("cifar_spos_supernet", (3, 32, 32), {}),
]


def agreement(predicted: list[float], measured: list[float]) -> dict[str, float]:
    """Median relative error of `predicted` against `measured`, and their rank correlation."""
    p, m = np.asarray(predicted), np.asarray(measured)
    return {
        "median_relative_error": round(float(np.median(np.abs(p / m - 1))), 4),
        "spearman": round(float(spearmanr(p, m).statistic), 4),
    }


def one_space(
    name: str, size: tuple[int, int, int], kwargs: dict[str, Any], archs: int, timing: TimingConfig
) -> dict[str, Any]:
    torch.manual_seed(0)
    net = create_backbone(name, num_classes=10, in_chans=size[0], **kwargs).eval()
    start = time.perf_counter()
    latency = SPOSLatency.build(net, size, timing)
    build_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    genes = [tuple(int(g) for g in rng.integers(0, net.space.gene_choices())) for _ in range(archs)]
    nets = [StaticExits(net.child(g).eval()).deploy() for g in genes]
    a, b = [], []
    with torch_threads(timing.threads):
        for deployed in nets:  # A and B interleaved: load hits both alike
            a.append(statistics.fmean(time_module(deployed, size, timing)))
            b.append(statistics.fmean(time_module(deployed, size, timing)))
    predicted = [latency.ms(g, net.space) for g in genes]
    return {
        "ops_in_table": len(latency.table.entries),
        "table_build_s": round(build_s, 1),
        "space_span_ms": [round(x, 3) for x in latency.span()],
        "measured_ms": {
            "min": round(min(a), 3),
            "median": round(statistics.median(a), 3),
            "max": round(max(a), 3),
        },
        "predicted_vs_measured": agreement(predicted, a),
        "noise_floor_b_vs_a": agreement(b, a),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    timing = TimingConfig(threads=args.threads)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["DYNLAB_CACHE"] = cache
        spaces = {name: one_space(name, size, kw, args.archs, timing) for name, size, kw in SPACES}
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "timing": vars(timing),
        "archs": args.archs,
        "spaces": spaces,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
