"""`make train`, the README's main command, runs its embedded default end to end (fewer epochs)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from .conftest import REPO


@pytest.mark.slow
def test_make_train_runs_the_embedded_default(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("MAKEFLAGS", None)
    proc = subprocess.run(
        ["make", "-s", "train", f"ARGS=trainer.max_epochs=1 hydra.run.dir={run}"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    # The default: S2DNAS, CIFAR ResNet-20 in 3 stages, on digits, W&B offline.
    assert (results["technique"], results["backbone"], results["dataset"]) == (
        "s2dnas",
        "cifar_resnet20",
        "digits",
    )
    assert results["status"] == "completed" and len(results["exit_macs"]) == 3
    assert results["metrics"]["test/top1"] > 50.0  # one epoch, chance is 10 %
    assert list((run / "wandb").glob("offline-run-*"))
