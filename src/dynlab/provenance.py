"""Where a run's figures come from: code (git commit, dirty tree), library versions, threads and
hardware, recorded in results.json next to the seed so that any figure can be traced and two runs
that disagree can be told apart."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
import sys
from datetime import UTC, datetime
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import dynlab

# Distributions whose versions decide a run's numbers (distribution name -> key in the record).
VERSIONED = {"torch": "torch", "pytorch-lightning": "lightning", "timm": "timm"}
# The fields that tell two starts of one run apart: a resume elsewhere or on other code.
IDENTITY = ("git", "versions", "threads", "cpu", "gpu", "host")


def collect(seed: int) -> dict[str, Any]:
    """This process's provenance: seed, code, versions, threads, CPU and GPU model, host, time."""
    import torch  # here, not at the top: reports read records without importing torch

    return {
        "seed": seed,
        "git": git_state(),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "gpu": gpu_models(),
        "host": socket.gethostname(),
        "recorded": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def merged(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """results.json sections for a (re)start: `provenance` is this start's record; a resumed run
    whose earlier start ran other code, versions or hardware keeps those in `provenance_history`."""
    history = list(previous.get("provenance_history") or [])
    earlier = previous.get("provenance")
    if earlier and any(earlier.get(k) != current.get(k) for k in IDENTITY):
        history.append(earlier)
    return {"provenance": current, "provenance_history": history}


@cache
def git_state() -> dict[str, Any] | None:
    """The commit of the dynlab checkout this code runs from and whether its tree differs from it
    (tracked changes or untracked files); None for an installed dynlab outside a git checkout."""
    root = Path(dynlab.__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = _git(root, "rev-parse", "HEAD")
        status = _git(root, "status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status)}


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


@cache
def versions() -> dict[str, str | None]:
    """Python, dynlab and the libraries that decide the numbers (None where one is missing)."""
    found: dict[str, str | None] = {
        "python": platform.python_version(),
        "dynlab": dynlab.__version__,
    }
    for dist, key in VERSIONED.items():
        try:
            found[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[key] = None
    import torch

    found["cuda"] = torch.version.cuda
    return found


@cache
def cpu_model() -> str:
    """The CPU's model name and the logical CPUs this process may use."""
    name = None
    if sys.platform == "linux":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    elif sys.platform == "darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            name = _sysctl("machdep.cpu.brand_string")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name or platform.processor() or platform.machine()} ({usable} logical CPUs)"


def _sysctl(key: str) -> str:
    return subprocess.run(
        ["sysctl", "-n", key], capture_output=True, text=True, check=True, timeout=5
    ).stdout.strip()


def gpu_models() -> list[str]:
    """The CUDA devices this process sees, by name; empty on a CPU-only machine."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def describe(record: dict[str, Any]) -> dict[str, str]:
    """A record as short strings for a report row (commit abbreviated, '+dirty' marked)."""
    git = record.get("git")
    code = "not a git checkout"
    if git:
        code = git["commit"][:10] + (" +dirty" if git["dirty"] else "")
    v = record.get("versions") or {}
    return {
        "code": code,
        "dynlab": str(v.get("dynlab")),
        "torch": str(v.get("torch")) + (f" (CUDA {v['cuda']})" if v.get("cuda") else ""),
        "lightning": str(v.get("lightning")),
        "timm": str(v.get("timm")),
        "threads": str(record.get("threads")),
        "cpu": str(record.get("cpu")),
        "gpu": ", ".join(record.get("gpu") or []) or "none",
    }
