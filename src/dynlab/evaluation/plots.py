"""Accuracy-vs-MACs figures as PNG files: anytime exits, a budgeted curve, many runs overlaid.

Figures are drawn on `matplotlib.figure.Figure` (Agg canvas), never through pyplot, so plotting
neither needs a display nor changes the global matplotlib backend of the caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_UNITS = ((1e9, "G"), (1e6, "M"), (1e3, "K"), (1.0, ""))


def plot_anytime(records: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Top-1 and top-5 of every exit against the cumulative MACs to reach it (anytime)."""
    scale, unit = _macs_unit([r["macs"] for r in records])
    fig, ax = _figure()
    macs = [r["macs"] / scale for r in records]
    ax.plot(macs, [r["top1"] for r in records], "o-", label="top-1")
    ax.plot(macs, [r["top5"] for r in records], "s--", label="top-5")
    for r, m in zip(records, macs, strict=True):
        ax.annotate(
            f"exit {r['exit']}", (m, r["top1"]), textcoords="offset points", xytext=(4, -12)
        )
    _finish(fig, ax, unit, "anytime prediction", "test accuracy (%)", path)


def plot_budgeted(
    curve: Sequence[Mapping[str, Any]], path: str | Path, label: str | None = None
) -> None:
    """Test top-1 against average MACs per sample over the budget levels (budgeted batch)."""
    plot_overlay([{"label": label or "budgeted batch", "budgeted": curve}], path)


def plot_overlay(runs: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Many runs on one accuracy-vs-MACs chart: a `budgeted` curve as a line, a `point` as a marker.

    Each run is {"label": str, "budgeted": [records]} or {"label": str, "point": (avg_macs, acc)}.
    """
    if not runs:
        raise ValueError("plot_overlay needs at least one run")
    for run in runs:
        if ("budgeted" in run) == ("point" in run):
            raise ValueError(f"run {run.get('label')!r} needs exactly one of 'budgeted' or 'point'")
    scale, unit = _macs_unit([m for run in runs for m in _run_macs(run)])
    fig, ax = _figure()
    for run in runs:
        if "budgeted" in run:
            curve = sorted(run["budgeted"], key=lambda r: r["avg_macs"])
            ax.plot(
                [r["avg_macs"] / scale for r in curve],
                [r["accuracy"] for r in curve],
                "o-",
                markersize=3,
                label=run["label"],
            )
        else:
            macs, accuracy = run["point"]
            ax.plot([macs / scale], [accuracy], "*", markersize=12, label=run["label"])
    _finish(fig, ax, unit, "budgeted batch classification", "test top-1 accuracy (%)", path)


def format_macs(value: float) -> str:
    """MACs in a short human form: 4.09G, 144, 12.5M."""
    scale, unit = _macs_unit([value])
    return f"{value / scale:.3g}{unit}"


def _run_macs(run: Mapping[str, Any]) -> list[float]:
    """The MACs values a run puts on the chart (its curve's levels or its single point)."""
    return [r["avg_macs"] for r in run["budgeted"]] if "budgeted" in run else [run["point"][0]]


def _macs_unit(values: Sequence[float]) -> tuple[float, str]:
    """The divisor and prefix (G, M, K) that make the largest MACs value readable."""
    largest = max(values, default=0.0)
    return next((scale, unit) for scale, unit in _UNITS if largest >= scale or scale == 1.0)


def _figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _finish(fig: Figure, ax: Axes, unit: str, title: str, ylabel: str, path: str | Path) -> None:
    """Label the axes, add the legend and grid, and write the PNG (creating its folder)."""
    ax.set_xlabel(f"MACs per sample ({unit}MACs)" if unit else "MACs per sample")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
