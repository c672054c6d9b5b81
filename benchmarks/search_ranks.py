"""Candidates per minute of a small search on 1 and on 2 gloo processes, side by side.

Runs the real `dynlab-search` with `trainer=cpu` and with `trainer=ddp_cpu`, one thread per
process, and times the technique's search phase from its ledger's first write to the phase's
`done` marker (and, next to it, to the ledger's last write: the candidates alone, without the
phase's closing work on one rank). `--technique`:
- `s2dnas` (default): digits, CIFAR ResNet-20 in 3 stages, 12 candidates of 8 batches each; the
  `search` phase;
- `spos`: digits, the 5-layer `cifar_spos_supernet_tiny` space after a 4-step supernet phase, an
  evolution of 3 generations of 8 (parents 4, 2 mutations, 2 crossovers), each candidate's BN
  recalibrated on 8 batches of 64 and scored on 200 val images; the `evolution` phase.
Target: the 2-process search spreads its candidates over both ranks (the ledger's `rank` fields)
and, on a machine with 2 free cores, approaches 2x.
Run: .venv/bin/python benchmarks/search_ranks.py [--technique s2dnas|spos]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dynlab.search.ledger import RECORDS

COMMON = [
    "dataset=digits",
    "evaluation.budgeted=false",
    "logger=none",
    "trainer.enable_progress_bar=false",
]
S2DNAS = [
    "technique=s2dnas",
    "backbone=cifar_resnet20",
    "technique.search.iterations=3",
    "technique.search.candidates_per_iteration=4",
    "technique.search.candidate_batches=8",
    "technique.search.top_k=1",
    "technique.search.retrain_epochs=1",
    "trainer.limit_train_batches=2",
    "evaluation.anytime=false",
]
SPOS = [
    "technique=spos",
    "backbone=cifar_spos_supernet_tiny",
    "dataset.batch_size=64",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "technique.evolution.population=8",
    "technique.evolution.generations=3",
    "technique.evolution.parents=4",
    "technique.evolution.mutations=2",
    "technique.evolution.crossovers=2",
    "technique.evolution.recalibration_batches=8",
    "technique.evolution.recalibration_batch_size=64",
    "technique.evolution.val_images=200",
]


PER_MINUTE = "candidates_per_minute"


@dataclass(frozen=True)
class Technique:
    """A search to time: its overrides and the phase whose ledger and done marker are timed."""

    overrides: list[str]
    phase: str
    benchmark: str


TECHNIQUES = {
    "s2dnas": Technique(S2DNAS, "search", "s2dnas_search_candidates_per_minute"),
    "spos": Technique(SPOS, "evolution", "spos_evolution_candidates_per_minute"),
}


def search_minutes(technique: Technique, trainer: str, run_dir: Path) -> dict:
    """Run the search; minutes from the phase ledger's first write to its done marker (and to
    the ledger's last write), candidates per minute, and the ranks that scored them."""
    phase = run_dir / "checkpoints" / technique.phase
    ledger = phase / RECORDS
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dynlab.apps.search", *technique.overrides, *COMMON]
    with (run_dir.parent / f"{trainer}.log").open("w") as log:
        proc = subprocess.Popen(
            [*command, f"trainer={trainer}", f"hydra.run.dir={run_dir}"],
            stdout=log,
            stderr=log,
            env=env,
        )
        first = done = last = None
        stamp = None
        while proc.poll() is None:
            try:
                mtime = ledger.stat().st_mtime_ns
            except FileNotFoundError:
                mtime = None
            if mtime is not None and done is None:
                now = time.perf_counter()
                if first is None:
                    first = now
                if mtime != stamp:  # a new save (atomic replace): seen at this poll
                    stamp, last = mtime, now
            if done is None and (phase / "done").exists():
                done = time.perf_counter()
            time.sleep(0.05)
    if proc.returncode != 0 or first is None or done is None:
        raise SystemExit(f"dynlab-search trainer={trainer} failed: see {log.name}")
    candidates = json.loads(ledger.read_text())
    minutes, scoring = (done - first) / 60, (last - first) / 60
    per_rank = Counter(c.get("rank", 0) for c in candidates)
    return {
        "candidates": len(candidates),
        "ranks": sorted(per_rank),
        "candidates_per_rank": {str(r): n for r, n in sorted(per_rank.items())},
        "minutes": round(minutes, 3),
        "candidates_per_minute": round(len(candidates) / minutes, 2),
        "minutes_to_last_ledger_write": round(scoring, 3),
        "candidates_per_minute_to_last_ledger_write": round(len(candidates) / scoring, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--technique", choices=tuple(TECHNIQUES), default="s2dnas")
    technique = TECHNIQUES[parser.parse_args().technique]
    with tempfile.TemporaryDirectory() as tmp:
        one = search_minutes(technique, "cpu", Path(tmp) / "one")
        two = search_minutes(technique, "ddp_cpu", Path(tmp) / "two")
    print(
        json.dumps(
            {
                "benchmark": technique.benchmark,
                "phase": technique.phase,
                "one_process": one,
                "two_gloo_processes": two,
                "speedup": round(two["candidates_per_minute"] / one["candidates_per_minute"], 2),
                "speedup_to_last_ledger_write": round(
                    two[f"{PER_MINUTE}_to_last_ledger_write"]
                    / one[f"{PER_MINUTE}_to_last_ledger_write"],
                    2,
                ),
                "both_ranks_scored": two["ranks"] == [0, 1],
                "cores": os.cpu_count(),
                "loadavg": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


if __name__ == "__main__":
    main()
