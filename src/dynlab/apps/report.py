"""`dynlab-report`: one comparison table (markdown + CSV) and one accuracy-vs-MACs figure for many runs.

    dynlab-report multirun/2025-06-01/12-00-00 runs/sweep -o report

Every run dir under the given paths (a folder holding `.hydra/` or `results.json`: a multirun
sweep, a Slurm array's run dirs) is read. Runs that did not complete (no results.json, status
running or failed, a diverged run, a results.json that is not valid JSON) are listed in a section
of their own with the reason, never dropped silently.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynlab.errors import ResultsError
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


def overlay_entry(run: Run, row: dict[str, Any]) -> dict[str, Any] | None:
    """A run on the overlay figure: its budgeted curve as a line, else (MACs, top-1) as a point."""
    label = row["varying_overrides"] or f"{row['technique']} · {row['backbone']} · {row['dataset']}"
    curve = (run.results.get("budgeted") or {}).get("curve")
    if curve:
        return {"label": label, "budgeted": curve}
    if row["macs"] is not None and row["top1"] is not None:
        return {"label": label, "point": (row["macs"], row["top1"])}
    return None


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a GitHub markdown table, numbers rounded for reading."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(column, row[column]) for column in COLUMNS) + " |")
    return "\n".join(lines)


def _cell(column: str, value: Any) -> str:
    if value is None or value == "":
        return "–"
    if column in ("params", "macs"):
        return format_macs(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|")


def write_report(paths: Sequence[Path], outdir: Path) -> str:
    """Write report.md, report.csv and accuracy_vs_macs.png into `outdir`; returns the markdown."""
    runs = load_runs(paths)
    if not runs:
        raise FileNotFoundError(
            f"no run dirs (with .hydra/ or {RESULTS_FILE}) under {list(map(str, paths))}"
        )
    done = [run for run in runs if run.completed]
    varying = varying_overrides(done)
    rows = [summary_row(run, varying[run.path]) for run in done]
    outdir.mkdir(parents=True, exist_ok=True)
    with open(outdir / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    sections = [f"# dynlab report: {len(done)} of {len(runs)} runs completed", ""]
    if rows:
        sections += [markdown_table(rows), ""]
    entries = [e for run, row in zip(done, rows, strict=True) if (e := overlay_entry(run, row))]
    if entries:
        plot_overlay(entries, outdir / "accuracy_vs_macs.png")
        sections += ["![accuracy vs MACs](accuracy_vs_macs.png)", ""]
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
    parser = argparse.ArgumentParser(prog="dynlab-report", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run dirs, or folders holding run dirs")
    parser.add_argument(
        "-o", "--outdir", type=Path, default=Path("report"), help="default: report/"
    )
    args = parser.parse_args(argv)
    try:
        markdown = write_report(args.paths, args.outdir)
    except FileNotFoundError as err:
        parser.error(str(err))
    print(markdown)
    print(f"report written to {args.outdir}/")


if __name__ == "__main__":
    main()
