"""An evolutionary search's outcome for its user (SPOS, MetaPruning): pareto.md, the search in
results.json, plots/pareto.png (every scored candidate, the Pareto front, the best), the front as
a logger table, one line on the console.

Drawn on `matplotlib.figure.Figure` with an Agg canvas (as `dynlab.evaluation.plots`), never
through pyplot, so it needs no display and leaves the caller's matplotlib backend alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dynlab.logging import log_records
from dynlab.results import atomic_write_text, update_results
from dynlab.search.driver import Outcome
from dynlab.search.evolution import best_candidate, pareto_front


def plot_pareto(
    records: Sequence[Mapping[str, Any]],
    front: Sequence[Mapping[str, Any]],
    path: str | Path,
    title: str = "evolutionary search",
) -> None:
    """Val top-1 against MACs (M) of every scored candidate, coloured by generation, with the
    Pareto front as a line and the best candidate starred; written as a PNG at `path`."""
    if not records:
        raise ValueError("plot_pareto needs at least one scored candidate")
    fig = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = ax.scatter(
        [r["macs"] / 1e6 for r in records],
        [r["top1"] for r in records],
        c=[r.get("round", 0) for r in records],
        cmap="viridis",
        s=14,
        alpha=0.8,
        label="candidates",
    )
    fig.colorbar(points, ax=ax, label="generation")
    line = sorted(front, key=lambda r: r["macs"])
    ax.plot(
        [r["macs"] / 1e6 for r in line],
        [r["top1"] for r in line],
        "-",
        color="C3",
        drawstyle="steps-post",
        label="Pareto front",
    )
    best = best_candidate(records)
    ax.plot(
        [best["macs"] / 1e6],
        [best["top1"]],
        "*",
        color="C1",
        markersize=14,
        markeredgecolor="k",
        label=f"best: {best['top1']:.2f}% at {best['macs'] / 1e6:.3g} M",
    )
    ax.set_xlabel("MACs per image (M)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"{title}: {len(records)} candidates")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def pareto_markdown(front: list[dict[str, Any]]) -> str:
    """The Pareto front as a markdown table, cheapest first."""
    lines = ["| M MACs | supernet val top-1 | genes |", "| ---: | ---: | --- |"]
    lines += [f"| {r['mmacs']:.2f} | {r['top1']:.2f} | {r['genes']} |" for r in front]
    return "\n".join(lines) + "\n"


def publish_evolution(
    outcome: Outcome,
    name: str,
    phase_dir: Path,
    run_dir: Path,
    loggers: Sequence[Any],
    summary: Mapping[str, Any],
) -> None:
    """pareto.md (phase dir), `summary` as results.json's search, plots/pareto.png, the front as
    the loggers' `<name>/pareto` table and the console (search_result.json is the driver's).
    Rank zero only."""
    result, front = outcome.result, outcome.result["pareto"]
    atomic_write_text(phase_dir / "pareto.md", pareto_markdown(front))
    update_results(run_dir, search=dict(summary))
    plot_pareto(
        outcome.records,
        pareto_front(outcome.records),
        run_dir / "plots" / "pareto.png",
        f"{name} evolutionary search",
    )
    table = [{"mmacs": r["mmacs"], "top1": r["top1"], "genes": str(r["genes"])} for r in front]
    log_records(
        loggers, f"{name}/pareto", table, "mmacs", "top1", f"{name} Pareto front (val top-1)"
    )
    print(pareto_markdown(front), end="")
    print(
        f"[dynlab] {name} search: best {result['architecture']} at {result['mmacs']:.2f} M MACs, "
        f"supernet val top-1 {result['supernet_val_top1']:.2f} ({result['evaluated']} "
        f"candidates); {outcome.path}"
    )
