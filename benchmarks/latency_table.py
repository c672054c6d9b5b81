"""How well a search space's latency table predicts whole networks on this CPU.

For each space (SPOS and FBNetV2): the table is built (timed and calibrated on its reference
networks; `DYNLAB_CACHE` is pointed at a fresh folder so nothing cached is reused), then `--archs`
random architectures (every choice uniform, another seed than the references') are built as
standalone deploy forms and timed whole at batch 1, twice, the two passes interleaved architecture
by architecture (A and B). Reported: the median relative error |predicted / A - 1| and Spearman's
rank correlation of predicted against A, for the calibrated prediction and for the plain sum of
the ops (FBNet's and once-for-all's), next to the noise floor, the same two figures of B against A
(how far two measurements of the same networks agree). Targets: median error <= 10 % and rank
correlation >= 0.9. Prints one JSON object.
Run: .venv/bin/python benchmarks/latency_table.py [--archs 50] [--threads 1] [--spaces ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from dynlab.backbones import create_backbone
from dynlab.backbones.fbnetv2 import CHOICE_KEYS
from dynlab.evaluation.latency import machine, torch_threads
from dynlab.protocol import StaticExits
from dynlab.search.latency_table import LatencyTable, TimingConfig, time_module
from dynlab.techniques.fbnetv2.latency import FBNetV2Latency
from dynlab.techniques.spos.latency import SPOSLatency

# An architecture's deploy form, predicted ms and summed ms.
Sample = tuple[nn.Module, float, float]


def spos(net: Any, size: tuple[int, int, int], archs: int, timing: TimingConfig) -> Any:
    """The SPOS table and `archs` random candidates (uniform genes, seed 0)."""
    latency = SPOSLatency.build(net, size, timing)
    rng = np.random.default_rng(0)
    genes = [tuple(int(g) for g in rng.integers(0, net.space.gene_choices())) for _ in range(archs)]
    samples = [
        (
            StaticExits(net.child(g).eval()).deploy(),
            latency.ms(g, net.space),
            latency.table.ops_ms(latency.op_keys(g, net.space)),
        )
        for g in genes
    ]
    return latency.table, latency.span(), samples


def fbnetv2(net: Any, size: tuple[int, int, int], archs: int, timing: TimingConfig) -> Any:
    """The FBNetV2 table and `archs` random architectures (uniform choices, seed 0)."""
    latency = FBNetV2Latency.build(net, size, timing)
    rng = np.random.default_rng(0)
    counts = net._option_counts()
    samples = []
    for _ in range(archs):
        c = {k: [int(rng.integers(n)) for n in counts[k]] for k in CHOICE_KEYS}
        c["resolution"] = c["resolution"][0]
        deployed = StaticExits(net.standalone(c).eval()).deploy()
        samples.append((deployed, latency.ms(c), latency.table.ops_ms(latency.op_keys(c))))
    return latency.table, latency.span(), samples


Builder = Callable[[Any, tuple[int, int, int], int, TimingConfig], Any]
# name: (builder, input size): SPOS's tiny space, the small one with channel search (as
# Fashion-MNIST is searched), the CIFAR one; FBNetV2's tiny and CIFAR spaces.
SPACES: dict[str, tuple[Builder, tuple[int, int, int]]] = {
    "cifar_spos_supernet_tiny": (spos, (3, 32, 32)),
    "cifar_spos_supernet_small": (spos, (1, 32, 32)),
    "cifar_spos_supernet": (spos, (3, 32, 32)),
    "cifar_fbnetv2_supernet_tiny": (fbnetv2, (3, 32, 32)),
    "cifar_fbnetv2_supernet": (fbnetv2, (3, 32, 32)),
}


def agreement(predicted: list[float], measured: list[float]) -> dict[str, float]:
    """Median relative error of `predicted` against `measured`, and their rank correlation."""
    p, m = np.asarray(predicted), np.asarray(measured)
    return {
        "median_relative_error": round(float(np.median(np.abs(p / m - 1))), 4),
        "spearman": round(float(spearmanr(p, m).statistic), 4),
    }


def one_space(name: str, archs: int, timing: TimingConfig) -> dict[str, Any]:
    builder, size = SPACES[name]
    torch.manual_seed(0)
    net = create_backbone(name, num_classes=10, in_chans=size[0]).eval()
    start = time.perf_counter()
    table: LatencyTable
    table, span, samples = builder(net, size, archs, timing)
    build_s = time.perf_counter() - start  # with building the architectures (seconds)
    a, b = [], []
    with torch_threads(timing.threads):
        for deployed, _, _ in samples:  # A and B interleaved: load hits both alike
            a.append(statistics.fmean(time_module(deployed, size, timing)))
            b.append(statistics.fmean(time_module(deployed, size, timing)))
    return {
        "ops_in_table": len(table.entries),
        "table_and_archs_build_s": round(build_s, 1),
        "calibration_scale": round(table.calibration["scale"], 4),
        "space_span_ms": [round(x, 3) for x in span],
        "measured_ms": {
            "min": round(min(a), 3),
            "median": round(statistics.median(a), 3),
            "max": round(max(a), 3),
        },
        "predicted_vs_measured": agreement([p for _, p, _ in samples], a),
        "summed_vs_measured": agreement([s for _, _, s in samples], a),
        "noise_floor_b_vs_a": agreement(b, a),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--spaces", nargs="+", default=list(SPACES), choices=list(SPACES))
    args = parser.parse_args()
    timing = TimingConfig(threads=args.threads)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["DYNLAB_CACHE"] = cache
        spaces = {name: one_space(name, args.archs, timing) for name in args.spaces}
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
