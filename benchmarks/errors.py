"""How fast and how clearly the apps refuse a bad command: each case as a user would type it.

Every case runs the real app (`dynlab-train`, `dynlab-search`, `dynlab-evaluate`) as a
subprocess in a scratch folder, three times, and records its exit status, its stderr (the last
line: the message), how many lines stderr had, and the median seconds. Target: each case ends
with one line and exit status 2 in under 3 s (`under_3s`): found before torch, Lightning and timm
are imported. The Slurm cases stand in for a machine without Slurm (`PATH` without sbatch) and
for one with Slurm's client but no controller (`SLURM_CONF` naming no file), so nothing is ever
submitted. Prints one JSON object.
Run: .venv/bin/python benchmarks/errors.py [--repeats 3] [--only CASE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TARGET_SECONDS = 3.0
BIN = Path(sys.executable).parent
# A one-epoch baseline on a few synthetic images: any slowness is the error path's own.
TINY = [
    "dataset=synthetic",
    "dataset.num_train=96",
    "dataset.num_test=64",
    "dataset.val_size=32",
    "technique=baseline",
    "backbone=cifar_resnet20",
    "trainer.max_epochs=1",
    "logger=none",
]
CIFAR10 = ["dataset=cifar10", "technique=baseline", "backbone=cifar_resnet20", "logger=none"]


@dataclass(frozen=True)
class Case:
    """One bad command: the app, its arguments and what its environment changes."""

    app: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)


def cases(scratch: Path) -> dict[str, Case]:
    """The bad commands, named; paths under `scratch`."""
    a_file = scratch / "a_file"
    a_file.write_text("not a folder\n")
    missing = str(scratch / "nowhere")
    no_cluster = scratch / "slurm.conf"  # Slurm's client finds no cluster in it (fast)
    no_cluster.touch()
    return {
        "negative_lr": Case("train", [*TINY, "technique.optim.lr=-1"]),
        "val_size_above_train_split": Case("train", [*TINY, "dataset.val_size=1000"]),
        "search_without_a_search": Case("search", TINY),
        "zero_epochs": Case("train", [*TINY, "trainer.max_epochs=0"]),
        "slurm_without_sbatch": Case(
            "train", ["-m", *TINY, "hydra/launcher=slurm"], {"PATH": str(BIN)}
        ),
        "slurm_without_controller": Case(
            "train", ["-m", *TINY, "hydra/launcher=slurm"], {"SLURM_CONF": str(no_cluster)}
        ),
        "data_root_is_a_file": Case("train", [*CIFAR10, f"dataset.root={a_file}"]),
        "unknown_option": Case("train", [*TINY, "backbone=nope"]),
        "wrong_type": Case("train", [*TINY, "trainer.max_epochs=abc"]),
        "misspelt_key": Case("train", [*TINY, "trainer.max_epoch=3"]),
        "train_missing_ckpt_path": Case("train", [*TINY, f"ckpt_path={missing}.ckpt"]),
        "search_missing_ckpt_path": Case(
            "search", [*TINY, "technique=s2dnas", f"ckpt_path={missing}.ckpt"]
        ),
        "evaluate_missing_ckpt_path": Case("evaluate", [f"ckpt_path={missing}.ckpt"]),
        "unknown_phase": Case("train", [*TINY, "phase=nope"]),
        "missing_data_root": Case("train", [*CIFAR10, f"dataset.root={missing}"]),
        "sfr_without_sfr_layers": Case("train", [*TINY, "technique=sfr"]),
        "spos_without_a_supernet": Case("train", [*TINY, "technique=spos"]),
    }


def command(app: str) -> list[str]:
    """The app's console script next to this Python, or `python -m` where none is installed."""
    script = BIN / f"dynlab-{app}"
    return [str(script)] if script.exists() else [sys.executable, "-m", f"dynlab.apps.{app}"]


def run(case: Case, scratch: Path) -> tuple[float, int, str]:
    """One run: seconds, exit status, stderr."""
    env = {**os.environ, "DYNLAB_OUTPUTS": str(scratch / "out"), **case.env}
    env.pop("HYDRA_FULL_ERROR", None)
    start = time.perf_counter()
    proc = subprocess.run(
        [*command(case.app), *case.args],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    return time.perf_counter() - start, proc.returncode, proc.stderr


def measure(name: str, case: Case, scratch: Path, repeats: int) -> dict[str, object]:
    """The case's median seconds over `repeats` runs, its exit status and its message."""
    seconds, status, stderr = [], 0, ""
    for _ in range(repeats):
        took, status, stderr = run(case, scratch)
        seconds.append(took)
    lines = stderr.strip().splitlines()
    median = statistics.median(seconds)
    return {
        "command": " ".join([f"dynlab-{case.app}", *case.args]),
        "env": case.env,
        "exit_status": status,
        "stderr_lines": len(lines),
        "message": lines[-1] if lines else "",
        "seconds": round(median, 3),
        "runs": [round(s, 3) for s in seconds],
        "under_3s": median < TARGET_SECONDS,
        "one_line_exit_2": status == 2 and len(lines) == 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="case names (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dynlab-errors-") as tmp:
        scratch = Path(tmp)
        chosen = {k: c for k, c in cases(scratch).items() if not args.only or k in args.only}
        results = {
            name: measure(name, case, scratch, args.repeats) for name, case in chosen.items()
        }
    report = {
        "target_seconds": TARGET_SECONDS,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cases": results,
        "all_under_3s": all(r["under_3s"] for r in results.values()),
        "all_one_line_exit_2": all(r["one_line_exit_2"] for r in results.values()),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
