"""dynlab-report over fake run dirs: table rows, CSV, figure, and incomplete runs listed."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from dynlab.apps.report import main, write_report
from dynlab.results import update_results

DYNAMIC = {
    "status": "completed",
    "technique": "gfnet",
    "backbone": "cifar_resnet20",
    "dataset": "cifar10",
    "overrides": ["dataset=cifar10", "technique=gfnet", "seed=1"],
    "params": 300_000,
    "exit_macs": [10e6, 25e6, 40e6],
    "metrics": {"test/top1": 91.5},
    "anytime": [
        {"exit": 1, "macs": 10e6, "top1": 80.0, "top5": 95.0},
        {"exit": 2, "macs": 25e6, "top1": 88.0, "top5": 98.0},
        {"exit": 3, "macs": 40e6, "top1": 91.5, "top5": 99.0},
    ],
    "budgeted": {
        "curve": [
            {"q": 0.1, "avg_macs": 9e6, "accuracy": 79.0},
            {"q": 0.5, "avg_macs": 10e6, "accuracy": 84.0},  # exactly 25% of 40M: counts
            {"q": 1.0, "avg_macs": 19e6, "accuracy": 89.0},
            {"q": 1.5, "avg_macs": 21e6, "accuracy": 90.0},  # over 50%
        ],
        "exit_macs": [10e6, 25e6, 40e6],
    },
}
STATIC = {
    "status": "completed",
    "technique": "baseline",
    "backbone": "cifar_resnet56",
    "dataset": "cifar10",
    "overrides": ["dataset=cifar10", "backbone=cifar_resnet56"],
    "params": 850_000,
    "exit_macs": [125e6],
    "metrics": {"test/top1": 93.0},
}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A multirun-like folder: two completed runs, a failed, a running and a never-written one."""
    root = tmp_path / "sweep"
    for name, results in [
        ("0_dynamic", DYNAMIC),
        ("1_static", STATIC),
        ("2_failed", {"status": "failed", "error": "RuntimeError: boom"}),
        ("3_running", {"status": "running", "phase": "stage2"}),
    ]:
        (root / name / ".hydra").mkdir(parents=True)
        update_results(root / name, **results)
    (root / "4_missing" / ".hydra").mkdir(parents=True)
    (root / ".submitit" / "12_0").mkdir(parents=True)  # submitit's logs are no run dirs
    return root


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def test_table_has_one_row_per_completed_run_with_its_summaries(
    sweep: Path, tmp_path: Path
) -> None:
    write_report([sweep], tmp_path / "out")

    rows = read_csv(tmp_path / "out" / "report.csv")
    assert set(rows) == {"sweep/0_dynamic", "sweep/1_static"}
    dynamic, static = rows["sweep/0_dynamic"], rows["sweep/1_static"]
    assert (dynamic["technique"], dynamic["backbone"], dynamic["dataset"]) == (
        "gfnet",
        "cifar_resnet20",
        "cifar10",
    )
    assert (
        dynamic["varying_overrides"] == "technique=gfnet seed=1"
    )  # not the shared dataset=cifar10
    assert static["varying_overrides"] == "backbone=cifar_resnet56"
    assert float(dynamic["macs"]) == 40e6 and int(dynamic["params"]) == 300_000
    assert float(dynamic["top1"]) == 91.5 and int(dynamic["exits"]) == 3
    assert (float(dynamic["anytime_first_top1"]), float(dynamic["anytime_last_top1"])) == (
        80.0,
        91.5,
    )
    assert float(dynamic["budgeted_top1_at_25pct_macs"]) == 84.0
    assert float(dynamic["budgeted_top1_at_50pct_macs"]) == 89.0
    assert float(static["macs"]) == 125e6 and float(static["top1"]) == 93.0
    assert static["anytime_first_top1"] == "" and static["budgeted_top1_at_50pct_macs"] == ""


def test_markdown_lists_incomplete_runs_and_links_the_figure(sweep: Path, tmp_path: Path) -> None:
    markdown = write_report([sweep], tmp_path / "out")

    assert markdown == (tmp_path / "out" / "report.md").read_text()
    assert "2 of 5 runs completed" in markdown
    table = markdown.split("## Incomplete runs")[0]
    assert (
        "| sweep/0_dynamic | gfnet | cifar_resnet20 | cifar10 | technique=gfnet seed=1 | 300K | 40M | 91.50 |"
        in table
    )
    incomplete = markdown.split("## Incomplete runs")[1]
    assert "`sweep/2_failed`: failed: RuntimeError: boom" in incomplete
    assert "`sweep/3_running`: still running in phase stage2" in incomplete
    assert "`sweep/4_missing`: no results.json" in incomplete
    assert "0_dynamic" not in incomplete and ".submitit" not in markdown
    figure = tmp_path / "out" / "accuracy_vs_macs.png"
    assert "](accuracy_vs_macs.png)" in markdown
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_from_several_paths_are_read_once(sweep: Path, tmp_path: Path) -> None:
    markdown = write_report([sweep, sweep / "1_static"], tmp_path / "out")
    assert "2 of 5 runs completed" in markdown


def test_cli_writes_the_report_and_rejects_missing_paths(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main([str(sweep / "1_static"), "-o", str(tmp_path / "single")])
    assert "1 of 1 runs completed" in capsys.readouterr().out
    assert read_csv(tmp_path / "single" / "report.csv").keys() == {"1_static"}

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere"), "-o", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "not a directory" in capsys.readouterr().err


def test_broken_and_diverged_runs_are_listed_with_their_reason(tmp_path: Path) -> None:
    """A results.json that is not JSON is 'broken'; a diverged run is 'failed' with its error."""
    root = tmp_path / "sweep"
    update_results(root / "ok", **STATIC)
    (root / "cut").mkdir(parents=True)
    (root / "cut" / "results.json").write_text('{"status": "compl')
    diverged = "TrainingDiverged: training diverged in phase 'train', epoch 0, step 2"
    update_results(root / "nan", status="failed", error=diverged, metrics={"test/loss": "nan"})

    markdown = write_report([root], tmp_path / "out")

    assert "1 of 3 runs completed" in markdown
    incomplete = markdown.split("## Incomplete runs")[1]
    assert "`sweep/cut`: broken: " in incomplete and "not valid JSON" in incomplete
    assert f"`sweep/nan`: failed: {diverged}" in incomplete
    assert set(read_csv(tmp_path / "out" / "report.csv")) == {"sweep/ok"}


def _dynamic(seed: int, shift: float, seconds: float) -> dict:
    """A 3-exit run whose curve is DYNAMIC's moved up by `shift` points."""
    curve = [{**p, "accuracy": p["accuracy"] + shift} for p in DYNAMIC["budgeted"]["curve"]]
    return {
        **DYNAMIC,
        "overrides": ["technique=gfnet", f"seed={seed}"],
        "budgeted": {"curve": curve},
        "metrics": {"test/top1": 91.5 + shift},
        "phase_seconds": {"stage1": seconds, "stage2": seconds},
    }


def test_seeds_group_into_mean_curves_measured_against_the_static_reference(
    tmp_path: Path,
) -> None:
    """Two seeds of a dynamic run become one mean curve with its spread; the table gives the
    MACs it needs to match the static reference (or 'not reached') and its accuracy at 25 % /
    50 % of the reference's MACs."""
    root = tmp_path / "sweep"
    static = {**STATIC, "backbone": "cifar_resnet20", "exit_macs": [40e6], "overrides": []}
    for name, results in [
        ("0", _dynamic(0, 0.0, 30.0)),
        ("1", _dynamic(1, 2.0, 90.0)),  # mean curve: DYNAMIC's + 1 point
        ("2", {**static, "overrides": ["technique=baseline"], "metrics": {"test/top1": 89.5}}),
        ("3", {**static, "technique": "sfr", "overrides": ["technique=sfr"], "exit_macs": [9e6]}),
        (
            "4",
            {
                **static,
                "technique": "spos",
                "overrides": ["technique=spos"],
                "exit_macs": [9e6],
                "metrics": {"test/top1": 80.0},
            },
        ),
    ]:
        (root / name / ".hydra").mkdir(parents=True)
        update_results(root / name, **results)
    markdown = write_report([root], tmp_path / "out")

    with open(tmp_path / "out" / "comparison.csv", newline="") as f:
        rows = {row["technique"]: row for row in csv.DictReader(f)}
    gfnet, static_row, sfr, spos = (
        rows["gfnet · cifar_resnet20"],
        rows["baseline · cifar_resnet20"],
        rows["sfr · cifar_resnet20"],
        rows["spos · cifar_resnet20"],
    )
    assert int(gfnet["seeds"]) == 2 and float(gfnet["top1"]) == 92.5
    assert float(gfnet["train_minutes"]) == 2.0  # (60 + 180) s / 2 seeds
    # mean curve 80, 85, 90, 91 at 9, 10, 19, 21 M: 89.5 is first reached at 19 M
    assert float(gfnet["macs_to_match_static"]) == 19e6
    assert float(gfnet["top1_at_25pct_static_macs"]) == 85.0  # 10 M <= 25 % of 40 M
    assert float(gfnet["top1_at_50pct_static_macs"]) == 90.0  # 19 M <= 20 M < 21 M
    assert static_row["static_reference"] == "True" and gfnet["static_reference"] == "False"
    # a point: matched at its own MACs if as accurate, else never; counted where it fits
    assert (
        float(sfr["macs_to_match_static"]) == 9e6
        and float(sfr["top1_at_25pct_static_macs"]) == 93.0
    )
    assert spos["macs_to_match_static"] == "" and float(spos["top1_at_25pct_static_macs"]) == 80.0
    assert "not reached" in markdown and "(static reference)" in markdown


def _made_on(commit: str, dirty: bool, seed: int, torch_version: str = "2.5.1") -> dict:
    return {
        "seed": seed,
        "git": {"commit": commit, "dirty": dirty},
        "versions": {
            "dynlab": "0.1.0",
            "torch": torch_version,
            "lightning": "2.4.0",
            "timm": "1.0.9",
        },
        "threads": 2,
        "cpu": "Some CPU (2 logical CPUs)",
        "gpu": [],
    }


def test_provenance_rows_tell_runs_made_by_other_code_apart(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    made = [
        ("a", _made_on("a" * 40, False, 0), []),
        ("b", _made_on("a" * 40, False, 1), []),
        ("c", _made_on("b" * 40, True, 0), [_made_on("a" * 40, False, 0, "2.4.0")]),
    ]
    for name, record, history in made:
        (root / name / ".hydra").mkdir(parents=True)
        update_results(root / name, **STATIC, provenance=record, provenance_history=history)

    markdown = write_report([root], tmp_path / "out")

    section = markdown.split("## Provenance")[1]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "aaaaaaaaaa" in line]
    assert len(rows) == 1 and "| 2 | 0, 1 | aaaaaaaaaa |" in rows[0]
    assert "| 1 | 0 | bbbbbbbbbb +dirty |" in section
    # The run resumed on other code names what it started on.
    assert "`runs/c`: started as code=aaaaaaaaaa" in section and "torch=2.4.0" in section
