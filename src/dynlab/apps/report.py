"""`dynlab-report`: one comparison table (markdown + CSV) and one accuracy-vs-MACs figure for many runs.

    dynlab-report multirun/2025-06-01/12-00-00 runs/sweep -o report

Every run dir under the given paths (a folder holding `.hydra/` or `results.json`: a multirun
sweep, a Slurm array's run dirs) is read. Runs that did not complete (no results.json, status
running or failed, a diverged run, a results.json that is not valid JSON) are listed in a section
of their own with the reason, never dropped silently.

Runs that differ only by their seed form one group (`dynlab.evaluation.comparison`): the figure
draws each group once, labelled `technique · backbone`, a dynamic technique as its mean budgeted
curve with the spread over seeds as a band, a static one as a point with its spread, the static
reference (the plain `baseline` run) marked; a second table compares the groups with it. Where
runs saved their per-test-image outcomes (`test_outcomes.npz`), that table also gives each group's
accuracy difference to the reference with a paired-bootstrap interval over the test images, and
the MACs at which it matches the reference within that interval (bootstrap.csv: every level).

`--versus OVERRIDE` sets each group against its counterpart, the group that differs from it only
by holding OVERRIDE (`--versus compare=metapruning_uniform`: each MetaPruning run against the
uniform-width baseline of the same MACs limit), with the same paired bootstrap (versus.csv).

`--x latency` adds accuracy_vs_latency.png: the same groups against the measured milliseconds per
image of their deploy forms (results.json's `latency`, at the budgeted curve's batch size, in
ONNX Runtime or, with `--runtime torch`, in PyTorch); runs measured without it are left out and
listed. Milliseconds compare only between runs measured on the same machine (the report's
provenance section names each run's).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynlab import provenance
from dynlab.apps import app_parser
from dynlab.errors import ResultsError
from dynlab.evaluation.bootstrap import CONFIDENCE, RESAMPLES, SEED
from dynlab.evaluation.comparison import (
    MATCH_COLUMN,
    MATCH_LEVEL,
    REFERENCE_LEVELS,
    STATIC_TECHNIQUE,
    Group,
    compare,
    group_runs,
    versus,
)
from dynlab.evaluation.outcomes import OUTCOMES_FILE, Outcomes, load_outcomes
from dynlab.evaluation.plots import format_macs, plot_overlay
from dynlab.results import RESULTS_FILE, read_results

# Budgeted-batch accuracy is summarised at these fractions of a run's full-model MACs.
MAC_LEVELS = (0.25, 0.5)
COLUMNS = (
    "run",
    "technique",
    "backbone",
    "dataset",
    "varying_overrides",
    "params",
    "macs",
    "top1",
    "exits",
    "anytime_first_top1",
    "anytime_last_top1",
    *(f"budgeted_top1_at_{int(level * 100)}pct_macs" for level in MAC_LEVELS),
)


@dataclass(frozen=True)
class Run:
    """A run dir and its results.json (empty when the run never wrote one)."""

    name: str
    path: Path
    results: dict[str, Any]

    @property
    def completed(self) -> bool:
        return self.results.get("status") == "completed"


def find_run_dirs(root: Path) -> list[Path]:
    """`root` itself if it is a run dir, else every run dir below it (not looking inside run dirs)."""
    found = []
    for folder, subdirs, files in os.walk(root):
        if ".hydra" in subdirs or RESULTS_FILE in files:
            found.append(Path(folder))
            subdirs.clear()
        else:
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    return found


def load_runs(paths: Iterable[Path]) -> list[Run]:
    """Every run dir under `paths` once, named by its path relative to the path it was found under."""
    runs: dict[Path, Run] = {}
    for root in paths:
        if not root.is_dir():
            raise FileNotFoundError(f"not a directory: {root}")
        for path in find_run_dirs(root):
            name = str(Path(root.name) / path.relative_to(root)) if path != root else root.name
            runs.setdefault(path.resolve(), Run(name, path, results_or_broken(path)))
    return list(runs.values())


def results_or_broken(path: Path) -> dict[str, Any]:
    """A run dir's results, or a stand-in with status "broken" and why it cannot be read."""
    try:
        return read_results(path)
    except ResultsError as err:
        return {"status": "broken", "error": str(err)}


def why_incomplete(run: Run) -> str:
    """A one-line reason a run has no final results."""
    status = run.results.get("status")
    if status is None:
        return f"no {RESULTS_FILE} (never started, or stopped before writing it)"
    if status == "failed":
        return f"failed: {run.results.get('error') or 'no error recorded'}"
    if status == "broken":
        return f"broken: {run.results.get('error')}"
    if status == "running":
        phase = run.results.get("phase")
        where = f" in phase {phase}" if phase else ""
        return f"still running{where}, or killed / requeued and not finished"
    return f"status {status!r}"


def varying_overrides(runs: Sequence[Run]) -> dict[Path, str]:
    """Each run's overrides minus those every run has: what tells the runs of a sweep apart."""
    overrides = {run.path: run.results.get("overrides") or [] for run in runs}
    shared = set.intersection(*map(set, overrides.values())) if overrides else set()
    return {
        path: " ".join(o for o in given if o not in shared) for path, given in overrides.items()
    }


def summary_row(run: Run, varying: str) -> dict[str, Any]:
    """One table row: names, size, full-model cost, accuracy, anytime and budgeted summaries."""
    res = run.results
    exit_macs = res.get("exit_macs") or []
    anytime = res.get("anytime") or []
    full_macs = exit_macs[-1] if exit_macs else None
    row: dict[str, Any] = {
        "run": run.name,
        "technique": res.get("technique"),
        "backbone": res.get("backbone"),
        "dataset": res.get("dataset"),
        "varying_overrides": varying,
        "params": res.get("params"),
        "macs": full_macs,
        "top1": (res.get("metrics") or {}).get("test/top1"),
        "exits": len(exit_macs) or None,
        "anytime_first_top1": anytime[0]["top1"] if anytime else None,
        "anytime_last_top1": anytime[-1]["top1"] if anytime else None,
    }
    curve = (res.get("budgeted") or {}).get("curve") or []
    for level, column in zip(MAC_LEVELS, COLUMNS[-len(MAC_LEVELS) :], strict=True):
        row[column] = best_accuracy_within(curve, level * full_macs) if full_macs else None
    return row


def best_accuracy_within(curve: Sequence[dict[str, Any]], budget: float) -> float | None:
    """The best budgeted-batch accuracy whose average MACs fit in `budget`, None if none does."""
    fitting = [r["accuracy"] for r in curve if r["avg_macs"] <= budget]
    return max(fitting, default=None)


COMPARE_COLUMNS = (
    "technique",
    "chart",
    "seeds",
    "params",
    "macs",
    "top1",
    "macs_to_match_static",
    "top1_diff_vs_static",
    "macs_to_match_static_ci",
    MATCH_COLUMN,
    *(f"top1_at_{int(level * 100)}pct_static_macs" for level in REFERENCE_LEVELS),
    "train_minutes",
)
# comparison.csv: the table's columns with the interval's bounds and what was paired.
COMPARE_CSV_COLUMNS = (
    *COMPARE_COLUMNS,
    "top1_diff_vs_static_low",
    "top1_diff_vs_static_high",
    "bootstrap_pairing",
    "top1_spread",
    "static_reference",
)
BOOTSTRAP_COLUMNS = ("technique", "avg_macs", "top1_diff", "low", "high", "matches")
VERSUS_COLUMNS = ("entry", "against", "seeds", "macs", "against_macs", "top1", "against_top1")
VERSUS_CSV_COLUMNS = (*VERSUS_COLUMNS, "top1_diff", "low", "high", "pairing")


def overlay_entry(group: Group, static: bool) -> dict[str, Any] | None:
    """A group on the overlay figure: its mean budgeted curve (with the spread over seeds) as a
    line, else (MACs, mean top-1) as a point; `static` marks the static reference."""
    curve = group.curve()
    if curve:
        return {"label": group.label, "budgeted": curve}
    if group.macs is not None and group.top1 is not None:
        point = (group.macs, group.top1)
        return {
            "label": group.label,
            "point": point,
            "spread": group.top1_spread,
            "reference": static,
        }
    return None


def static_line_entry(groups: Sequence[Group]) -> dict[str, Any] | None:
    """The plain static networks (technique baseline, no backbone options) joined in order of
    MACs, when there are two or more: the line a technique has to beat, not one point."""
    static = [
        g
        for g in groups
        if g.technique == STATIC_TECHNIQUE
        and g.plain_backbone
        and g.macs is not None
        and g.top1 is not None
    ]
    if len(static) < 2:
        return None
    static.sort(key=lambda g: g.macs)  # type: ignore[arg-type,return-value]
    names = ", ".join(g.backbone for g in static)
    return {
        "label": f"static networks ({names})",
        "budgeted": [{"avg_macs": g.macs, "accuracy": g.top1} for g in static],
        "static_line": True,
    }


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """The rows as a GitHub markdown table, numbers rounded for reading."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(column, row[column]) for column in columns) + " |")
    return "\n".join(lines)


def comparison_cells(row: dict[str, Any]) -> dict[str, Any]:
    """A comparison row for reading: top-1 with its spread, 'not reached', the reference marked."""
    cells = dict(row)
    if row["top1"] is not None and row["top1_spread"] is not None:
        cells["top1"] = f"{row['top1']:.2f} ± {row['top1_spread']:.2f}"
    if row["static_reference"]:
        cells["technique"] = f"**{row['technique']}** (static reference)"
    elif row["macs_to_match_static"] is None and row["top1"] is not None:
        cells["macs_to_match_static"] = "not reached"
    if row["top1_diff_vs_static"] is not None:
        cells["top1_diff_vs_static"] = (
            f"{row['top1_diff_vs_static']:+.2f} "
            f"[{row['top1_diff_vs_static_low']:+.2f}, {row['top1_diff_vs_static_high']:+.2f}]"
        )
        if row["macs_to_match_static_ci"] is None:
            cells["macs_to_match_static_ci"] = "not matched"
    if row[MATCH_COLUMN] is not None:
        cells[MATCH_COLUMN] = "yes" if row[MATCH_COLUMN] else "no"
    return cells


def outcomes_or_none(run: Run) -> tuple[Outcomes | None, str | None]:
    """A run's per-test-image outcomes, or None and why (no file: a run older than it)."""
    try:
        found = load_outcomes(run.path)
    except ResultsError as err:
        return None, str(err)
    return found, None if found is not None else f"no {OUTCOMES_FILE}"


def bootstrap_note(
    runs: Sequence[Run], outcomes: Sequence[Outcomes | None], problems: Sequence[str | None]
) -> str:
    """How the intervals were computed, and which runs had no outcomes to resample."""
    images = next((o.num_images for o in outcomes if o is not None), None)
    on = f"the {images:,} test images" if images is not None else "the test images"
    note = (
        f"`top1_diff_vs_static`: top-1 of the group minus the static reference's, in points, "
        f"with its {CONFIDENCE:.0%} interval from a paired bootstrap over {on} ({RESAMPLES:,} "
        f"resamples, seed {SEED}): each resample draws the same images for both. Runs are paired "
        f"seed by seed where the two groups share seeds, else each group's seeds are pooled "
        f"(`bootstrap_pairing` in comparison.csv). `macs_to_match_static_ci`: the fewest average "
        f"MACs (along a curve's budget levels) whose interval includes 0 or lies above it; "
        f"`{MATCH_COLUMN}`: whether that is at most {MATCH_LEVEL:.0%} of the reference's MACs. "
        f"Every level's interval: bootstrap.csv."
    )
    missing = [
        f"`{run.name}` ({why})" for run, why in zip(runs, problems, strict=True) if why is not None
    ]
    if missing:
        note += "\n\nRuns left out of the bootstrap (no outcomes): " + ", ".join(missing) + "."
    return note


def _cell(column: str, value: Any) -> str:
    if value is None or value == "":
        return "–"
    macs_columns = (
        "params",
        "macs",
        "against_macs",
        "macs_to_match_static",
        "macs_to_match_static_ci",
    )
    if column in macs_columns and not isinstance(value, str):
        return format_macs(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|")


PROVENANCE_COLUMNS = ("runs", "seeds", *provenance.describe({}).keys())


def provenance_section(runs: Sequence[Run]) -> str:
    """Which code, versions and hardware made the runs: one row per distinct provenance (more
    than one row means the figures were not all made alike), and the runs resumed elsewhere."""
    made_by: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        record = run.results.get("provenance")
        key = (
            tuple(provenance.describe(record).values())
            if record
            else ("not recorded",) * (len(PROVENANCE_COLUMNS) - 2)
        )
        made_by.setdefault(key, []).append(run)
    rows = []
    for key, members in made_by.items():
        seeds = sorted({str((r.results.get("provenance") or {}).get("seed", "?")) for r in members})
        rows.append(
            dict(zip(PROVENANCE_COLUMNS, (len(members), ", ".join(seeds), *key), strict=True))
        )
    lines = [markdown_table(rows, PROVENANCE_COLUMNS)]
    mixed = [run for run in runs if run.results.get("provenance_history")]
    if mixed:
        lines += ["", "Resumed on other code, versions or hardware than they started on:"]
        lines += [
            f"- `{run.name}`: started as "
            + "; ".join(
                " ".join(f"{k}={v}" for k, v in provenance.describe(earlier).items())
                for earlier in run.results["provenance_history"]
            )
            for run in mixed
        ]
    return "\n".join(lines)


def timed_batch(results: dict[str, Any]) -> int | None:
    """The batch size of a run's budgeted timings (its latency settings' `budget_batch`)."""
    return ((results.get("latency") or {}).get("settings") or {}).get("budget_batch")


def latency_results(results: dict[str, Any], runtime: str) -> dict[str, Any] | None:
    """A copy of a run's results with its measured ms per image (`runtime`, at the batch size of
    its budgeted timings) in place of MACs: each exit's, and each budget level's (joined by q);
    None when the run was not timed in that runtime."""
    latency = results.get("latency") or {}
    per_exit = (latency.get("exits") or {}).get(f"batch_{timed_batch(results)}", {}).get(runtime)
    if not per_exit:
        return None
    copy = {**results, "exit_macs": [e["ms_per_image"] for e in per_exit]}
    curve = (results.get("budgeted") or {}).get("curve") or []
    if len(per_exit) > 1 and curve:
        ms = {
            r["q"]: r[runtime]["ms_per_image"] for r in latency.get("budgeted", []) if runtime in r
        }
        if any(r["q"] not in ms for r in curve):
            return None
        copy["budgeted"] = {"curve": [{**r, "avg_macs": ms[r["q"]]} for r in curve]}
    return copy


def latency_figure(
    done: Sequence[Run], varying: dict[Path, str], runtime: str, path: Path
) -> list[str]:
    """accuracy_vs_latency.png of the runs timed in `runtime`; the report's lines about it."""
    timed = [(run, latency_results(run.results, runtime)) for run in done]
    kept = [(varying[run.path].split(), res) for run, res in timed if res is not None]
    left_out = [run.name for run, res in timed if res is None]
    lines = []
    if kept:
        groups = group_runs(kept)
        entries = [e for g in groups if (e := overlay_entry(g, False))]
        if line := static_line_entry(groups):
            entries.insert(0, line)
        batch = ", ".join(map(str, sorted({timed_batch(run.results) for run, r in timed if r})))
        label = f"measured ms per image ({runtime}, batch {batch})"
        plot_overlay(entries, path, x_label=label)
        lines += [f"![accuracy vs measured latency]({path.name})", ""]
    if left_out:
        lines += [f"Not timed in {runtime} (left off the latency chart): {', '.join(left_out)}", ""]
    return lines


def versus_section(rows: Sequence[dict[str, Any]], override: str, outdir: Path) -> list[str]:
    """versus.csv and the report's lines setting each group against its counterpart holding
    `override` (`comparison.versus`)."""
    with open(outdir / "versus.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=VERSUS_CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    readable = [
        {
            **row,
            "top1_diff": "–"
            if row["top1_diff"] is None
            else f"{row['top1_diff']:+.2f} [{row['low']:+.2f}, {row['high']:+.2f}]",
        }
        for row in rows
    ]
    pairing = sorted({row["pairing"] for row in rows if row["pairing"]})
    return [
        f"## Against `{override}`",
        "",
        markdown_table(readable, (*VERSUS_COLUMNS, "top1_diff")),
        "",
        f"`top1_diff`: the entry's top-1 minus its counterpart's (the group that differs from it "
        f"only by `{override}`), in points, with its {CONFIDENCE:.0%} paired-bootstrap interval "
        f"over the test images ({RESAMPLES:,} resamples, seed {SEED}; "
        f"{'; '.join(pairing) or 'no outcomes files: no interval'}).",
        "",
    ]


def write_report(
    paths: Sequence[Path],
    outdir: Path,
    x: str = "macs",
    runtime: str = "onnxruntime",
    versus_override: str | None = None,
) -> str:
    """Write report.md, report.csv and accuracy_vs_macs.png into `outdir` (and, with x="latency",
    accuracy_vs_latency.png; with `versus_override`, versus.csv); returns the markdown. ValueError
    (before writing anything) when no group holds `versus_override`."""
    runs = load_runs(paths)
    if not runs:
        raise FileNotFoundError(
            f"no run dirs (with .hydra/ or {RESULTS_FILE}) under {list(map(str, paths))}"
        )
    done = [run for run in runs if run.completed]
    varying = varying_overrides(done)
    rows = [summary_row(run, varying[run.path]) for run in done]
    outcomes, problems = zip(*map(outcomes_or_none, done), strict=True) if done else ((), ())
    groups = group_runs([(varying[run.path].split(), run.results) for run in done], outcomes)
    comparison = compare(groups)
    against = versus(groups, versus_override) if versus_override else None
    outdir.mkdir(parents=True, exist_ok=True)
    with open(outdir / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    with open(outdir / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COMPARE_CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(comparison)
    levels = [
        {"technique": row["technique"], **level}
        for row in comparison
        for level in row["bootstrap_levels"]
    ]
    (outdir / "bootstrap.csv").unlink(missing_ok=True)  # none left from an earlier report
    if levels:
        with open(outdir / "bootstrap.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=BOOTSTRAP_COLUMNS)
            writer.writeheader()
            writer.writerows(levels)

    sections = [f"# dynlab report: {len(done)} of {len(runs)} runs completed", ""]
    entries = [
        e
        for group, row in zip(groups, comparison, strict=True)
        if (e := overlay_entry(group, row["static_reference"]))
    ]
    if entries and (line := static_line_entry(groups)):
        entries.insert(0, line)
    if entries:
        plot_overlay(entries, outdir / "accuracy_vs_macs.png")
        sections += ["![accuracy vs MACs](accuracy_vs_macs.png)", ""]
    if x == "latency" and done:
        sections += latency_figure(done, varying, runtime, outdir / "accuracy_vs_latency.png")
    if comparison:
        readable = [comparison_cells(row) for row in comparison]
        sections += ["## By technique", "", markdown_table(readable, COMPARE_COLUMNS), ""]
        sections += [bootstrap_note(done, outcomes, problems), ""]
    (outdir / "versus.csv").unlink(missing_ok=True)  # none left from an earlier report
    if against is not None:
        sections += versus_section(against, str(versus_override), outdir)
    if rows:
        sections += ["## Runs", "", markdown_table(rows), ""]
    if done:
        sections += ["## Provenance", "", provenance_section(done), ""]
    incomplete = [run for run in runs if not run.completed]
    if incomplete:
        sections += ["## Incomplete runs", ""]
        sections += [f"- `{run.name}`: {why_incomplete(run)}" for run in incomplete]
        sections.append("")
    markdown = "\n".join(sections)
    (outdir / "report.md").write_text(markdown)
    return markdown


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: `dynlab-report PATH... [-o OUTDIR]`."""
    parser = app_parser("dynlab-report", __doc__)
    parser.add_argument("paths", nargs="+", type=Path, help="run dirs, or folders holding run dirs")
    parser.add_argument(
        "-o", "--outdir", type=Path, default=Path("report"), help="default: report/"
    )
    parser.add_argument(
        "--x",
        choices=("macs", "latency"),
        default="macs",
        help="latency: also accuracy against measured ms per image (accuracy_vs_latency.png)",
    )
    parser.add_argument(
        "--runtime",
        choices=("onnxruntime", "torch"),
        default="onnxruntime",
        help="whose measured latency --x latency draws (default: onnxruntime)",
    )
    parser.add_argument(
        "--versus",
        metavar="OVERRIDE",
        help="also set every group against the group that differs from it only by holding this "
        "override (e.g. compare=metapruning_uniform), by a paired bootstrap (versus.csv)",
    )
    args = parser.parse_args(argv)
    try:
        markdown = write_report(args.paths, args.outdir, args.x, args.runtime, args.versus)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(markdown)
    print(f"report written to {args.outdir}/")


if __name__ == "__main__":
    main()
