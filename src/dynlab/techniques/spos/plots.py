"""SPOS's evolutionary search as a PNG: every scored candidate, the Pareto front, the best.

Drawn on `matplotlib.figure.Figure` with an Agg canvas (as `dynlab.evaluation.plots`), never
through pyplot, so it needs no display and leaves the caller's matplotlib backend alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dynlab.search.evolution import best_candidate


def plot_pareto(
    records: Sequence[Mapping[str, Any]], front: Sequence[Mapping[str, Any]], path: str | Path
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
    best = best_candidate(records, "spos")
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
    ax.set_title(f"SPOS evolutionary search: {len(records)} candidates")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
