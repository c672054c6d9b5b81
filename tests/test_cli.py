"""The console apps as users run them: a multirun of DDP jobs logging to W&B, and dynlab-evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import TINY, run_cli


def _run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("results.json"))


@pytest.mark.slow
def test_multirun_of_ddp_cpu_jobs_with_wandb(tmp_path):
    """The three traps together: DDP re-executing argv in a -m run, a leftover wandb.run, env vars."""
    # 63 test images: the ranks' shards differ (31 and 32), so a mean of per-rank means is not
    # the accuracy; torchmetrics' summed counts are.
    tiny = [o.replace("dataset.num_test=64", "dataset.num_test=63") for o in TINY]
    args = ["-m", *tiny, "logger=wandb", "trainer=ddp_cpu", "seed=0,1"]
    run_cli("train", args, cwd=tmp_path)
    runs = _run_dirs(tmp_path / "out")
    assert len(runs) == 2, runs
    seeds = set()
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        assert results["status"] == "completed", results.get("error")
        assert {"test/top1", "test/loss"} <= results["metrics"].keys()
        assert results["anytime"] and results["budgeted"]["curve"]
        # The logged accuracy is exact over all 63 images: it equals the anytime evaluation's,
        # counted on the outputs gathered from both ranks.
        assert results["metrics"]["test/top1"] == pytest.approx(results["anytime"][-1]["top1"])
        # Only rank zero logs: one offline W&B run for the training phase, one for the evaluation.
        wandb_runs = sorted((run / "wandb").glob("offline-run-*"))
        assert len(wandb_runs) == 2, wandb_runs
        seeds.add(results["config"]["seed"])
        assert any(o.startswith("seed=") for o in results["overrides"])
    assert seeds == {0, 1}
    # No job re-swept the multirun: exactly the two job folders exist.
    assert len([p for p in (tmp_path / "out").rglob(".hydra") if p.is_dir()]) == 2


@pytest.mark.slow
def test_evaluate_app_reproduces_training_metrics(tmp_path):
    run_cli("train", [*TINY, "hydra.run.dir=train_run"], cwd=tmp_path)
    trained = json.loads((tmp_path / "train_run/results.json").read_text())
    ckpt = tmp_path / "train_run/checkpoints/train/final.ckpt"
    run_cli("evaluate", [f"ckpt_path={ckpt}", "hydra.run.dir=eval_run"], cwd=tmp_path)
    evaluated = json.loads((tmp_path / "eval_run/results.json").read_text())
    assert evaluated["metrics"]["test/top1"] == pytest.approx(trained["metrics"]["test/top1"])
    assert evaluated["budgeted"]["curve"] == trained["budgeted"]["curve"]
    assert evaluated["checkpoint"] == str(ckpt.resolve())


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such checkpoint file"), ("epoch,top1\n", "not a torch checkpoint")],
    ids=["missing", "not-a-checkpoint"],
)
def test_evaluate_app_rejects_what_is_no_checkpoint_in_one_line(tmp_path, content, message):
    if content is not None:
        (tmp_path / "nope.ckpt").write_text(content)
    proc = run_cli(
        "evaluate", ["ckpt_path=nope.ckpt", "hydra.run.dir=e"], cwd=tmp_path, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"dynlab-evaluate: error: ckpt_path=nope.ckpt: {message}")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
