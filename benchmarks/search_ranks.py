"""Candidates per minute of a small S2DNAS search on 1 and on 2 gloo processes, side by side.

Runs the real `dynlab-search` (digits, CIFAR ResNet-20 in 3 stages, 12 candidates of 8 batches
each) with `trainer=cpu` and with `trainer=ddp_cpu`, one thread per process, and times the search
phase from the ledger's first write to the phase's `done` marker. Target: the 2-process search
spreads its candidates over both ranks and, on a machine with 2 free cores, approaches 2x.
Run: .venv/bin/python benchmarks/search_ranks.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEARCH = [
    "technique=s2dnas",
    "dataset=digits",
    "backbone=cifar_resnet20",
    "technique.search.iterations=3",
    "technique.search.candidates_per_iteration=4",
    "technique.search.candidate_batches=8",
    "technique.search.top_k=1",
    "technique.search.retrain_epochs=1",
    "trainer.limit_train_batches=2",
    "evaluation.anytime=false",
    "evaluation.budgeted=false",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


def search_minutes(trainer: str, run_dir: Path) -> dict:
    """Run the search; minutes from the search ledger's first write to its done marker."""
    phase = run_dir / "checkpoints" / "search"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dynlab.apps.search", *SEARCH, f"trainer={trainer}"]
    with (run_dir.parent / f"{trainer}.log").open("w") as log:
        proc = subprocess.Popen(
            [*command, f"hydra.run.dir={run_dir}"], stdout=log, stderr=log, env=env
        )
        first = done = None
        while proc.poll() is None:
            ledger = next(iter(phase.glob("*.json")), None) if phase.exists() else None
            if first is None and ledger is not None:
                first = time.perf_counter()
            if done is None and (phase / "done").exists():
                done = time.perf_counter()
            time.sleep(0.05)
    if proc.returncode != 0 or first is None or done is None:
        raise SystemExit(f"dynlab-search trainer={trainer} failed: see {log.name}")
    candidates = json.loads((phase / "candidates.json").read_text())
    minutes = (done - first) / 60
    return {
        "candidates": len(candidates),
        "ranks": sorted({c.get("rank", 0) for c in candidates}),
        "candidates_per_minute": round(len(candidates) / minutes, 2),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        one = search_minutes("cpu", Path(tmp) / "one")
        two = search_minutes("ddp_cpu", Path(tmp) / "two")
    print(
        json.dumps(
            {
                "benchmark": "s2dnas_search_candidates_per_minute",
                "one_process": one,
                "two_gloo_processes": two,
                "speedup": round(two["candidates_per_minute"] / one["candidates_per_minute"], 2),
                "cores": os.cpu_count(),
                "loadavg": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


if __name__ == "__main__":
    main()
