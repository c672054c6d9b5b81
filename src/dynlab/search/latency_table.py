"""Latency lookup tables: every op a search space can put in a network, timed in isolation on this
device, so a search can predict an architecture's milliseconds as the sum of its ops' (the method
of FBNet, Sec. 3.2, and once-for-all's latency tables).

A table is {key: {"mean": ms, "std": ms, "count": n}} (once-for-all's lookup-table format), each
key naming an op by its kind and shapes (`ShuffleV2_3x3-input:16x16x32-output:16x16x32-...`), so
ops of the same shape are timed once. An op is timed at batch 1 in eval mode without autograd:
`warmup` untimed calls, then `rounds` timed rounds of `calls` calls each; mean and std are over
the rounds' per-call times. Tables are cached per device (CPU model or GPU), runtime, torch
version and thread count, under `$DYNLAB_CACHE` (default `~/.cache/dynlab`)/latency.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynlab.evaluation.latency import machine, torch_threads
from dynlab.results import atomic_write_text

__all__ = ["LatencyTable", "Op", "TimingConfig", "cached_table", "time_module", "time_ops"]

Op = tuple[nn.Module, tuple[int, ...]]  # a module and its input's (C, H, W)


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
    ops were timed); `predict` sums the means of an architecture's ops."""

    entries: dict[str, dict[str, float]]
    device: dict[str, Any] = field(default_factory=dict)

    def predict(self, keys: Iterable[str]) -> float:
        """Predicted milliseconds of a network made of the ops `keys` (in any order)."""
        return sum(self.entries[key]["mean"] for key in keys)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "entries": self.entries}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        return cls(dict(data["entries"]), dict(data.get("device", {})))


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


def cached_table(
    name: str,
    space: Mapping[str, Any],
    ops: Callable[[], Mapping[str, Op]],
    timing: TimingConfig,
    runtime: str = "torch",
) -> LatencyTable:
    """The latency table of search space `space` (a JSON-able description) on this machine's CPU
    in eager PyTorch (`runtime`): read from the cache, or built from `ops()` (timed) and cached.
    `name` prefixes the file."""
    device = machine()
    identity = {"space": space, "timing": vars(timing), "torch": device["torch"]}
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    folder = _cache_root() / _slug(device["cpu"]) / f"{runtime}-{timing.threads}t"
    path = folder / f"{name}-{digest[:12]}.json"
    if path.is_file():
        return LatencyTable.from_dict(json.loads(path.read_text()))
    table = LatencyTable(time_ops(ops(), timing), {**device, **identity, "runtime": runtime})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(table.to_dict(), indent=1))
    return table


def _cache_root() -> Path:
    return Path(os.environ.get("DYNLAB_CACHE", Path.home() / ".cache" / "dynlab")) / "latency"


def _slug(text: str | None) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text or "unknown").strip("-").lower()
