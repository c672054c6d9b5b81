"""Measured time of a deploy form: each exit's milliseconds per image, and early exit's under a
budget's thresholds, in PyTorch (eager) and in ONNX Runtime (an export, dynlab.evaluation.export).

A measurement is a pass over a fixed set of images at one batch size, timed `repeats` times after
`warmup` untimed passes; the runtimes take turns pass by pass, so machine load hits them alike.
Each figure is the median pass, with its spread (10th-90th percentile over the median). The noise
floor is an A/A test: the same run measured twice as if it were two runs; how far their ratio is
from 1 says how far any ratio of this machine can be trusted.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from dynlab.evaluation.early_exit import early_exit_predict
from dynlab.evaluation.outputs import module_device

# A pass: runs once over the images and gives the cumulative seconds to reach each exit.
Pass = Callable[[], list[float]]


def machine() -> dict[str, Any]:
    """What ran a measurement: CPU model and cores, torch/ONNX Runtime threads and versions, GPU,
    and the load average (a busy machine widens every spread)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):  # noqa: SIM115 - read once, Linux only
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    record: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
    }
    try:
        import onnxruntime

        record["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        record["onnxruntime"] = None
    return record


@contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads set to `threads` for the block (None: left as they are)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def interleaved(
    passes: Mapping[str, Pass], warmup: int, repeats: int, sync: Callable[[], None] | None = None
) -> dict[str, list[list[float]]]:
    """Each pass run `warmup` untimed then `repeats` timed times, the passes taking turns;
    {name: [one list of cumulative seconds per exit, per repeat]}."""
    times: dict[str, list[list[float]]] = {name: [] for name in passes}
    for round_ in range(warmup + repeats):
        for name, run in passes.items():
            if sync is not None:
                sync()
            seconds = run()
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def summary(seconds: Sequence[float], images: int) -> dict[str, float]:
    """Median milliseconds per image over the repeats, and the spread (p10..p90 / median)."""
    ordered = sorted(seconds)
    median = statistics.median(ordered)
    low, high = _quantile(ordered, 0.1), _quantile(ordered, 0.9)
    return {
        "ms_per_image": round(median * 1e3 / images, 5),
        "spread": round((high - low) / median, 4) if median > 0 else math.nan,
    }


def _quantile(ordered: Sequence[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    lo, hi = math.floor(position), math.ceil(position)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


def exit_pass(model: nn.Module, batches: Sequence[Tensor], sync: Callable[[], None] | None) -> Pass:
    """A pass of `model.exit_session` over `batches` with nobody leaving: the time to reach each
    exit (the network run up to that exit, nothing more), summed over the batches."""

    batches = [b.to(module_device(model)) for b in batches]

    def run() -> list[float]:
        totals: list[float] = []
        with torch.no_grad():
            for batch in batches:
                begin = time.perf_counter()
                session = model.exit_session(batch)
                reached = []
                for _ in range(session.num_exits):
                    session.next_exit()
                    if sync is not None:
                        sync()
                    reached.append(time.perf_counter() - begin)
                totals = (
                    reached if not totals else [a + b for a, b in zip(totals, reached, strict=True)]
                )
        return totals

    return run


def early_exit_pass(
    model: nn.Module,
    batches: Sequence[Tensor],
    thresholds: Sequence[float],
    sync: Callable[[], None] | None,
) -> Pass:
    """A pass of real early exit (`early_exit_predict`) under `thresholds` (results.json writes
    an unreachable one as "inf"): its total time."""
    batches = [b.to(module_device(model)) for b in batches]
    thresholds = [float(t) for t in thresholds]

    def run() -> list[float]:
        begin = time.perf_counter()
        for batch in batches:
            early_exit_predict(model, batch, thresholds)
        if sync is not None:
            sync()
        return [time.perf_counter() - begin]

    return run


def split(images: Tensor, batch_size: int) -> list[Tensor]:
    """`images` in batches of `batch_size` (the last one full: a partial batch is dropped)."""
    usable = len(images) - len(images) % batch_size
    if usable == 0:
        raise ValueError(f"{len(images)} images are fewer than one batch of {batch_size}")
    return list(images[:usable].split(batch_size))


def measure_exits(
    runtimes: Mapping[str, nn.Module],
    images: Tensor,
    batch_sizes: Sequence[int],
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Each runtime's milliseconds per image to reach each exit, at each batch size (`images`
    split into batches of it), next to the A/A noise floor of the first runtime at each size.
    `runtimes` maps a name to a model answering `exit_session` (a deploy form, an OnnxExits)."""
    first = next(iter(runtimes))
    sync = _sync_for(runtimes[first])
    result: dict[str, Any] = {}
    for batch_size in batch_sizes:
        batches = split(images, batch_size)
        passes = {name: exit_pass(model, batches, sync) for name, model in runtimes.items()}
        again = f"{first} (again)"
        passes[again] = exit_pass(runtimes[first], batches, sync)
        times = interleaved(passes, warmup, repeats, sync)
        n = len(batches) * batch_size
        entry: dict[str, Any] = {
            name: [summary([t[k] for t in times[name]], n) for k in range(len(times[name][0]))]
            for name in runtimes
        }
        entry["noise_floor"] = noise_floor(times[first], times[again])
        result[f"batch_{batch_size}"] = entry
    return result


def noise_floor(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> dict[str, float]:
    """The A/A test: the same run measured as two; the ratio of their medians to the last exit
    (1 on a quiet machine), and |ratio - 1|, the smallest difference a ratio can resolve here."""
    ratio = statistics.median(t[-1] for t in a) / statistics.median(t[-1] for t in b)
    return {"a_a_ratio": round(ratio, 4), "resolves": round(abs(ratio - 1), 4)}


def measure_budgets(
    runtimes: Mapping[str, nn.Module],
    images: Tensor,
    curve: Sequence[Mapping[str, Any]],
    batch_size: int,
    warmup: int,
    repeats: int,
) -> list[dict[str, Any]]:
    """For each budget level of `curve` (its calibrated thresholds), each runtime's measured
    milliseconds per image of real early exit over `images` at `batch_size`."""
    first = next(iter(runtimes))
    sync = _sync_for(runtimes[first])
    batches, records = split(images, batch_size), []
    n = len(batches) * batch_size
    for level in curve:
        passes = {
            name: early_exit_pass(model, batches, level["thresholds"], sync)
            for name, model in runtimes.items()
        }
        times = interleaved(passes, warmup, repeats, sync)
        records.append(
            {"q": level["q"]} | {name: summary([t[0] for t in times[name]], n) for name in runtimes}
        )
    return records


def _sync_for(model: nn.Module) -> Callable[[], None] | None:
    return torch.cuda.synchronize if module_device(model).type == "cuda" else None
