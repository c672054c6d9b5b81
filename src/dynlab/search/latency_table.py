"""Latency lookup tables: every op a search space can put in a network, timed in isolation on this
device, so a search can predict an architecture's milliseconds as the sum of its ops' (the method
of FBNet, Sec. 3.2, and once-for-all's latency tables).

A table is {key: {"mean": ms, "std": ms, "count": n}} (once-for-all's lookup-table format), each
key naming an op by its kind and shapes (`ShuffleV2_3x3-input:16x16x32-output:16x16x32-...`), so
ops of the same shape are timed once. An op is timed at batch 1 in eval mode without autograd:
`warmup` untimed calls, then `rounds` timed rounds of `calls` calls each; mean and std are over
the rounds' per-call times. Tables are cached per device (CPU model or GPU), runtime, torch
version and thread count, under `$DYNLAB_CACHE` (default `~/.cache/dynlab`)/latency; processes
that need the same table (DDP ranks) take turns on a file lock, so one times it and the others read it.

The sum of ops timed alone falls short of the whole network: at batch 1 on a CPU the calls
between ops (module calls, the blocks' own forward, allocation) and colder caches take a share of
a small network's time that no op's entry holds (benchmarks/README.md). dynlab therefore also
times `REFERENCES` whole networks of the space, drawn at random, when it builds a table and scales
every prediction by the median ratio of measured to summed (`calibration`); FBNet and
once-for-all sum the ops as they are. One scale keeps predictions proportional, so it changes no
ranking and no gradient's direction.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynlab.evaluation.latency import machine, torch_threads
from dynlab.nn.reparam import fold_and_merge
from dynlab.results import atomic_write_text

__all__ = [
    "REFERENCES",
    "REFERENCE_SEED",
    "LatencyTable",
    "Op",
    "Reference",
    "TimingConfig",
    "cached_table",
    "deploy_op",
    "latency_summary",
    "op_key",
    "time_module",
    "time_ops",
]

Op = tuple[nn.Module, tuple[int, ...]]  # a module and its input's (C, H, W)
REFERENCES = 8  # whole networks a table is calibrated on
REFERENCE_SEED = 1  # they are drawn from numpy's default_rng(REFERENCE_SEED)
# A whole network in deploy form, its input's (C, H, W) and the keys of its ops in the table.
Reference = tuple[nn.Module, tuple[int, ...], list[str]]


@dataclass(frozen=True)
class TimingConfig:
    """How an op is timed: this many threads, untimed calls, timed rounds and calls a round."""

    threads: int = 1
    warmup: int = 5
    rounds: int = 15
    calls: int = 10


@dataclass
class LatencyTable:
    """Each op's milliseconds on one device (`device`: `evaluation.latency.machine()` and how the
    ops were timed) and the calibration of their sums against whole networks (`scale`, with the
    reference networks' [summed, measured] ms); `predict` is an architecture's calibrated sum."""

    entries: dict[str, dict[str, float]]
    device: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=lambda: {"scale": 1.0})

    def ops_ms(self, keys: Iterable[str]) -> float:
        """The sum of the means of the ops `keys` (in any order), uncalibrated."""
        return sum(self.entries[key]["mean"] for key in keys)

    def calibrate(self, ops_ms: Any) -> Any:
        """Predicted milliseconds of a whole network from the sum of its ops' (a float or a
        tensor: the scale keeps a search's expected latency differentiable)."""
        return ops_ms * self.calibration["scale"]

    def predict(self, keys: Iterable[str]) -> float:
        """Predicted milliseconds of a network made of the ops `keys` (in any order)."""
        return self.calibrate(self.ops_ms(keys))

    def timed_on(self) -> dict[str, Any]:
        """What the table was timed on (CPU, threads, torch), as a search's identity holds it."""
        d = self.device
        return {
            "cpu": d.get("cpu"),
            "threads": d.get("timing", {}).get("threads"),
            "torch": d.get("torch"),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "calibration": self.calibration, "entries": self.entries}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        calibration = dict(data.get("calibration", {"scale": 1.0}))
        return cls(dict(data["entries"]), dict(data.get("device", {})), calibration)


def op_key(kind: str, size: tuple[int, ...], out: tuple[int, ...]) -> str:
    """once-for-all's key of an op: its kind, then input and output as HxWxC (from (C, H, W))."""
    hwc = lambda s: "x".join(str(d) for d in (*s[1:], s[0]))  # noqa: E731
    return f"{kind}-input:{hwc(size)}-output:{hwc(out)}"


def deploy_op(module: nn.Module) -> nn.Module:
    """A copy of an op as a network's deploy form runs it, BatchNorm folded into its convs. Held
    in a container, as in the net: torch.fx cannot trace some blocks as the root of a trace, but
    traces them inside one."""
    deployed = nn.Sequential(copy.deepcopy(module)).eval()
    fold_and_merge(deployed)
    return deployed


def time_module(module: nn.Module, size: tuple[int, ...], timing: TimingConfig) -> list[float]:
    """Milliseconds per call of `module` on one random batch-1 input of `size`, one figure per
    timed round (this process's current torch threads)."""
    module = module.eval()
    x = torch.randn(1, *size)
    per_round = []
    with torch.no_grad():
        for _ in range(timing.warmup):
            module(x)
        for _ in range(timing.rounds):
            start = time.perf_counter()
            for _ in range(timing.calls):
                module(x)
            per_round.append((time.perf_counter() - start) * 1e3 / timing.calls)
    return per_round


def time_ops(ops: Mapping[str, Op], timing: TimingConfig) -> dict[str, dict[str, float]]:
    """Each op timed in isolation with `timing.threads` threads: {key: mean, std, count}."""
    entries = {}
    with torch_threads(timing.threads):
        for key, (module, size) in ops.items():
            ms = time_module(module, size, timing)
            entries[key] = {
                "mean": statistics.fmean(ms),
                "std": statistics.stdev(ms) if len(ms) > 1 else 0.0,
                "count": len(ms),
            }
    return entries


def calibration(
    entries: Mapping[str, Mapping[str, float]],
    references: Sequence[Reference],
    timing: TimingConfig,
) -> dict[str, Any]:
    """The scale from summed op times to whole networks: the median over `references` (timed
    whole with `timing.threads` threads) of measured / summed ms. The median, not a fit: a few
    networks of similar sums determine an offset or slope poorly, a ratio well."""
    table, pairs = LatencyTable(dict(entries)), []
    with torch_threads(timing.threads):
        for net, size, keys in references:
            pairs.append([table.ops_ms(keys), statistics.fmean(time_module(net, size, timing))])
    scale = statistics.median(m / s for s, m in pairs) if pairs else 1.0
    return {"scale": scale, "references": pairs}


def cached_table(
    name: str,
    space: Mapping[str, Any],
    ops: Callable[[], Mapping[str, Op]],
    timing: TimingConfig,
    references: Callable[[], Sequence[Reference]] | None = None,
    runtime: str = "torch",
) -> LatencyTable:
    """The latency table of search space `space` (a JSON-able description) on this machine's CPU
    in eager PyTorch (`runtime`): read from the cache, or built from `ops()` (timed), calibrated
    on `references()` (whole networks of the space; none: sums as they are) and cached. `name`
    prefixes the file."""
    device = machine()
    identity = {
        "space": space,
        "timing": vars(timing),
        "torch": device["torch"],
        "calibrated": references is not None,
    }
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    folder = _cache_root() / _slug(device["cpu"]) / f"{runtime}-{timing.threads}t"
    path = folder / f"{name}-{digest[:12]}.json"
    folder.mkdir(parents=True, exist_ok=True)
    # One process times a table at a time (DDP ranks on one machine would skew each other's
    # timings); the others wait, then read what it wrote.
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return LatencyTable.from_dict(json.loads(path.read_text()))
        entries = time_ops(ops(), timing)
        scale = calibration(entries, references(), timing) if references else {"scale": 1.0}
        table = LatencyTable(entries, {**device, **identity, "runtime": runtime}, scale)
        atomic_write_text(path, json.dumps(table.to_dict(), indent=1))
    return table


def latency_summary(technique: str, table: LatencyTable, span: tuple[float, float]) -> str:
    """One console line on a search's latency table: its ops, device and threads, the calibration
    scale and the space's predicted span (what a time window or target must meet)."""
    on = table.timed_on()
    return (
        f"[dynlab] {technique} latency table: {len(table.entries)} ops on {on['cpu']} with "
        f"{on['threads']} thread(s), calibration x{table.calibration['scale']:.3f}; the space's "
        f"architectures span {span[0]:.3f} to {span[1]:.3f} ms per image (batch 1)"
    )


def _cache_root() -> Path:
    return Path(os.environ.get("DYNLAB_CACHE", Path.home() / ".cache" / "dynlab")) / "latency"


def _slug(text: str | None) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text or "unknown").strip("-").lower()
