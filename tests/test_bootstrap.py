"""Paired bootstrap over test images: intervals on synthetic outcomes, the outcomes file written at
the end of a run, and the report's bootstrap columns."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from dynlab.apps.report import static_line_entry, write_report
from dynlab.errors import ResultsError
from dynlab.evaluation.bootstrap import paired_bootstrap
from dynlab.evaluation.budgeted import budgeted_curve, budgeted_curve_and_exits
from dynlab.evaluation.callbacks import record_outcomes
from dynlab.evaluation.comparison import (
    MATCH_COLUMN,
    Group,
    group_runs,
    paired_comparison,
    run_seed,
)
from dynlab.evaluation.outcomes import (
    OUTCOMES_FILE,
    load_outcomes,
    make_outcomes,
    save_outcomes,
)
from dynlab.results import update_results

N = 10_000  # Fashion-MNIST's test set


def wrong_on(count: int, n: int = N) -> np.ndarray:
    """Per-image correctness [n]: the first `count` images wrong, the rest right."""
    correct = np.ones(n, dtype=bool)
    correct[:count] = False
    return correct


def test_an_entry_identical_to_the_reference_matches() -> None:
    reference = wrong_on(1_000)
    (interval,) = paired_bootstrap(reference.copy(), reference)
    assert interval.difference == 0.0
    assert interval.low <= 0.0 <= interval.high
    assert interval.matches


def test_an_entry_five_points_worse_on_10000_images_does_not_match() -> None:
    reference, entry = wrong_on(1_000), wrong_on(1_500)  # 90 % against 85 %
    (interval,) = paired_bootstrap(entry, reference)
    assert interval.difference == pytest.approx(-5.0)
    assert interval.low < -5.0 < interval.high < -4.0  # paired: about ±0.4 points wide
    assert not interval.matches


def test_the_same_seed_gives_the_same_intervals() -> None:
    rng = np.random.default_rng(1)
    reference, entry = rng.random(N) < 0.9, rng.random((3, N)) < 0.89
    first = paired_bootstrap(entry, reference, resamples=500, seed=7)
    assert paired_bootstrap(entry, reference, resamples=500, seed=7) == first
    assert paired_bootstrap(entry, reference, resamples=500, seed=8) != first
    assert len(first) == 3  # one interval per operating point


def test_mismatched_test_sets_are_rejected() -> None:
    with pytest.raises(ValueError, match="same non-empty test set"):
        paired_bootstrap(np.ones(5), np.ones(6))


def tiny_split(n: int, seed: int, num_exits: int = 3, classes: int = 4) -> tuple:
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(num_exits, n, classes, generator=g).mul(2).softmax(dim=2)
    return probs, torch.randint(0, classes, (n,), generator=g)


def test_outcomes_round_trip_from_a_tiny_budgeted_evaluation(tmp_path: Path) -> None:
    """The file the callbacks write gives back every curve point image by image, in small dtypes;
    the anytime evaluation writing after the budgeted one keeps its exits."""
    val, test = tiny_split(40, 0), tiny_split(50, 1)
    exit_macs, qs = [10.0, 25.0, 40.0], (0.5, 1.0, 2.0)
    curve, exits = budgeted_curve_and_exits(*val, *test, exit_macs, qs)
    assert curve == budgeted_curve(*val, *test, exit_macs, qs) and exits.shape == (3, 50)

    record_outcomes(tmp_path, *test, exit_macs, exits, qs)  # the budgeted evaluation
    record_outcomes(tmp_path, *test, exit_macs)  # then the anytime one
    loaded = load_outcomes(tmp_path)

    assert loaded is not None and (tmp_path / OUTCOMES_FILE).exists()
    assert not list(tmp_path.glob(f".{OUTCOMES_FILE}*"))  # no temp file left behind
    assert {a.dtype for a in (loaded.targets, loaded.predictions, loaded.exits)} == {
        np.dtype(np.uint8)
    }
    np.testing.assert_array_equal(loaded.targets, test[1].numpy())
    np.testing.assert_array_equal(loaded.predictions, test[0].argmax(dim=2).numpy())
    np.testing.assert_array_equal(loaded.exits, exits.numpy())
    np.testing.assert_array_equal(loaded.qs, qs)
    accuracy = 100 * loaded.budgeted_correct().mean(axis=1)
    assert accuracy == pytest.approx([r["accuracy"] for r in curve])
    assert loaded.budgeted_macs() == pytest.approx([r["avg_macs"] for r in curve])


def test_new_predictions_replace_stale_budgeted_exits(tmp_path: Path) -> None:
    test = tiny_split(50, 1)
    record_outcomes(tmp_path, *test, [1.0, 2.0, 3.0], torch.zeros(2, 50, dtype=torch.long), [1, 2])
    other = tiny_split(50, 2)
    record_outcomes(tmp_path, *other, [1.0, 2.0, 3.0])
    loaded = load_outcomes(tmp_path)
    assert loaded is not None and loaded.exits is None and loaded.qs is None


def test_a_missing_file_is_none_and_a_broken_one_an_error(tmp_path: Path) -> None:
    assert load_outcomes(tmp_path) is None
    (tmp_path / OUTCOMES_FILE).write_bytes(b"PK not a zip")
    with pytest.raises(ResultsError, match="not a readable outcomes file"):
        load_outcomes(tmp_path)
    with pytest.raises(ValueError, match="predictions"):
        make_outcomes([0, 1], [[0, 1, 2]], [1.0])


# A synthetic sweep on FEW test images: a reference right on 90 %, a 3-exit entry whose budget
# levels send everybody to exit 1, 2 or 3 (exits 2 and 3 answer as the reference does, exit 1
# is 20 points worse), a static entry 5 points worse, and a run older than outcomes files.
FEW = 2_000
EXIT_MACS = [10e6, 15e6, 40e6]


def predictions(wrong: int, targets: np.ndarray) -> np.ndarray:
    """Labels right on all but the first `wrong` images."""
    return np.where(wrong_on(wrong, len(targets)), targets, (targets + 1) % 10)


def write_run(root: Path, name: str, results: dict, outcomes=None) -> None:
    (root / name / ".hydra").mkdir(parents=True)
    update_results(root / name, status="completed", dataset="fashion_mnist", **results)
    if outcomes is not None:
        save_outcomes(root / name, outcomes)


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    targets = np.random.default_rng(0).integers(0, 10, FEW)
    static = {"technique": "baseline", "backbone": "cifar_resnet20", "exit_macs": [40e6]}
    reference = predictions(FEW // 10, targets)[None]
    exits = np.repeat(np.arange(3)[:, None], FEW, axis=1)
    dynamic_preds = np.stack([predictions(3 * FEW // 10, targets), reference[0], reference[0]])
    curve = [
        {"q": q, "avg_macs": m, "accuracy": a}
        for q, m, a in zip((0.1, 1.0, 1.9), EXIT_MACS, (70.0, 90.0, 90.0), strict=True)
    ]
    dynamic = {
        "technique": "gfnet",
        "backbone": "cifar_resnet20",
        "exit_macs": EXIT_MACS,
        "budgeted": {"curve": curve},
        "metrics": {"test/top1": 90.0},
    }
    worse = {**static, "technique": "sfr", "exit_macs": [30e6], "metrics": {"test/top1": 85.0}}
    for seed in (0, 1):
        write_run(
            root,
            f"ref{seed}",
            {
                **static,
                "overrides": ["technique=baseline", f"seed={seed}"],
                "metrics": {"test/top1": 90.0},
            },
            make_outcomes(targets, reference, [40e6]),
        )
        write_run(
            root,
            f"dyn{seed}",
            {**dynamic, "overrides": ["technique=gfnet", f"seed={seed}"]},
            make_outcomes(targets, dynamic_preds, EXIT_MACS, exits, [0.1, 1.0, 1.9]),
        )
    # Seed 2 only: shares no seed with the reference, so both sides are pooled.
    write_run(
        root,
        "sfr2",
        {**worse, "overrides": ["technique=sfr", "seed=2"]},
        make_outcomes(targets, predictions(3 * FEW // 20, targets)[None], [30e6]),
    )
    old = {**static, "technique": "spos", "overrides": ["technique=spos", "seed=0"]}
    write_run(root, "old", {**old, "metrics": {"test/top1": 80.0}})
    return root


def test_the_report_ranks_groups_against_the_reference_by_bootstrap(
    sweep: Path, tmp_path: Path
) -> None:
    markdown = write_report([sweep], tmp_path / "out")

    with open(tmp_path / "out" / "comparison.csv", newline="") as f:
        rows = {row["technique"].split(" · ")[0]: row for row in csv.DictReader(f)}
    gfnet, sfr, spos, ref = rows["gfnet"], rows["sfr"], rows["spos"], rows["baseline"]
    # gfnet's full network answers as the reference; it matches from its second level, 15 M
    assert float(gfnet["top1_diff_vs_static"]) == 0.0
    assert float(gfnet["top1_diff_vs_static_low"]) <= 0 <= float(gfnet["top1_diff_vs_static_high"])
    assert float(gfnet["macs_to_match_static_ci"]) == float(gfnet["macs_to_match_static"]) == 15e6
    assert gfnet[MATCH_COLUMN] == "True" and gfnet["bootstrap_pairing"] == "paired by seed: 0, 1"
    # sfr is 5 points worse: its interval lies below 0, it never matches
    assert float(sfr["top1_diff_vs_static"]) == pytest.approx(-5.0)
    assert float(sfr["top1_diff_vs_static_high"]) < 0
    assert sfr["macs_to_match_static_ci"] == "" and sfr[MATCH_COLUMN] == "False"
    assert sfr["bootstrap_pairing"] == "pooled: 1 run(s) vs 2"
    # a run without an outcomes file, and the reference itself: empty cells
    for row in (spos, ref):
        assert (
            row["top1_diff_vs_static"] == row["macs_to_match_static_ci"] == row[MATCH_COLUMN] == ""
        )
    with open(tmp_path / "out" / "bootstrap.csv", newline="") as f:
        levels = [r for r in csv.DictReader(f) if r["technique"].startswith("gfnet")]
    assert [r["matches"] for r in levels] == ["False", "True", "True"]
    assert float(levels[0]["top1_diff"]) == pytest.approx(-20.0)

    table = markdown.split("## By technique")[1]
    assert "top1_diff_vs_static" in table and MATCH_COLUMN in table
    assert "+0.00 [+0.00, +0.00]" in table and "not matched" in table
    assert "paired bootstrap over the 2,000 test images (2,000 resamples, seed 0)" in table
    assert "`sweep/old` (no test_outcomes.npz)" in table


def test_versus_sets_each_group_against_its_counterpart_of_the_same_limit(tmp_path: Path) -> None:
    """A search against its baseline at two MACs limits, two seeds, and a static run beside them:
    each search is paired with the baseline of its own limit only, seed by seed; 3 points better
    on 2,000 images lies clear of 0, an identical answer does not."""
    root = tmp_path / "sweep"
    targets = np.random.default_rng(0).integers(0, 10, FEW)
    wrong = {("search", 10): 140, ("uniform", 10): 200, ("search", 20): 100, ("uniform", 20): 100}
    for (entry, limit), count in wrong.items():
        for seed in (0, 1):
            overrides = [f"+compare={entry}", f"max_mmacs={limit}", f"seed={seed}"]
            results = {
                "technique": "metapruning",
                "backbone": "r20",
                "exit_macs": [limit * 1e6 - (1e5 if entry == "search" else 0)],
                "metrics": {"test/top1": 100 * (1 - count / FEW)},
                "overrides": overrides,
            }
            preds = predictions(count, targets)[None]
            outcomes = make_outcomes(targets, preds, results["exit_macs"])
            write_run(root, f"{entry}{limit}-{seed}", results, outcomes)
    write_run(root, "static", {"technique": "baseline", "backbone": "r20", "exit_macs": [40e6]})
    other = {"technique": "spos", "backbone": "r20", "exit_macs": [9e6]}  # another technique
    write_run(root, "spos", {**other, "overrides": ["+compare=spos", "max_mmacs=10", "seed=0"]})

    markdown = write_report([root], tmp_path / "out", versus_override="compare=uniform")
    with open(tmp_path / "out" / "versus.csv", newline="") as f:
        rows = {row["entry"].split(" · ")[-1]: row for row in csv.DictReader(f)}
    assert set(rows) == {"compare=search max_mmacs=10", "compare=search max_mmacs=20"}
    ten, twenty = rows["compare=search max_mmacs=10"], rows["compare=search max_mmacs=20"]
    assert ten["against"].endswith("compare=uniform max_mmacs=10")
    assert float(ten["top1_diff"]) == pytest.approx(3.0) and float(ten["low"]) > 0
    assert float(twenty["top1_diff"]) == 0.0 and ten["pairing"] == "paired by seed: 0, 1"
    assert float(twenty["macs"]) < float(twenty["against_macs"]) == 20e6
    assert "## Against `compare=uniform`" in markdown and "+3.00 [" in markdown
    with pytest.raises(ValueError, match=r"--versus compare=none: .*compare=spos, compare=uniform"):
        write_report([root], tmp_path / "out", versus_override="compare=none")


def test_groups_without_outcomes_or_seeds_compare_as_before() -> None:
    results = {"technique": "baseline", "backbone": "r20", "exit_macs": [1.0], "overrides": []}
    (group,) = group_runs([([], results)])
    assert paired_comparison(group, group) is None
    assert run_seed({"provenance": {"seed": 3}, "overrides": ["seed=4"]}) == 3
    assert run_seed({"overrides": ["+seed=4"]}) == 4 and run_seed(results) is None


def test_the_plain_static_networks_form_the_line_to_beat() -> None:
    def static(name: str, macs: float, top1: float, key: str = "") -> Group:
        results = {"technique": "baseline", "backbone": name, "exit_macs": [macs]}
        return Group(
            key=key or f"backbone={name}", results=[{**results, "metrics": {"test/top1": top1}}]
        )

    deep, shallow = static("r20", 40.0, 92.0), static("r8", 12.0, 89.5)
    repvgg = static("r20", 40.0, 92.3, key="backbone.kwargs.conv=repvgg")
    preset = static("r20", 40.0, 92.3, key="+compare=r20_repvgg")  # options from a preset
    preset.results[0]["config"] = {"backbone": {"name": "r20", "kwargs": {"conv": "repvgg"}}}
    line = static_line_entry([deep, repvgg, preset, shallow])
    assert line is not None and line["static_line"]
    assert line["budgeted"] == [
        {"avg_macs": 12.0, "accuracy": 89.5},
        {"avg_macs": 40.0, "accuracy": 92.0},
    ]  # in order of cost, the re-parameterised variant left out
    assert static_line_entry([deep, repvgg]) is None  # one plain network is a point, not a line
