"""Accuracy-vs-MACs figures as PNG files: anytime exits, a budgeted curve, many runs overlaid.

Figures are drawn on `matplotlib.figure.Figure` (Agg canvas), never through pyplot, so plotting
neither needs a display nor changes the global matplotlib backend of the caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

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


def plot_overlay(
    runs: Sequence[Mapping[str, Any]], path: str | Path, x_label: str | None = None
) -> None:
    """Many runs on one accuracy-vs-MACs chart: a `budgeted` curve as a line, a `point` as a marker.
    With `x_label`, the "avg_macs" values are another cost (measured milliseconds), drawn as they
    are under that label.

    Each run is {"label": str, "budgeted": [records]} or {"label": str, "point": (avg_macs, acc)}.
    Optional keys: a curve's records may carry "low"/"high" (the spread over seeds, drawn as a
    band), a point "spread" (an error bar); "reference": True marks the static reference, and a
    curve with "static_line": True is drawn as a grey dashed line behind the rest (the static
    networks joined in order of cost: the line to beat). The legend sits outside the data; MACs
    go on a log axis when they span more than 10x.
    """
    if not runs:
        raise ValueError("plot_overlay needs at least one run")
    for run in runs:
        if ("budgeted" in run) == ("point" in run):
            raise ValueError(f"run {run.get('label')!r} needs exactly one of 'budgeted' or 'point'")
    all_macs = [m for run in runs for m in _run_macs(run)]
    scale, unit = _macs_unit(all_macs) if x_label is None else (1.0, "")
    fig, ax = _figure(wide=len(runs) > 1)
    # Past ten entries the colours repeat, so every further ten take another marker and line.
    palette, drawn = colormaps["tab10"].colors, 0
    for run in runs:
        if not (run.get("static_line") or run.get("reference")):
            color, lap = palette[drawn % len(palette)], drawn // len(palette)
            drawn += 1
        if run.get("static_line"):
            curve = sorted(run["budgeted"], key=lambda r: r["avg_macs"])
            macs = [r["avg_macs"] / scale for r in curve]
            accuracy = [r["accuracy"] for r in curve]
            ax.plot(macs, accuracy, "--", color="grey", zorder=1, label=run["label"])
        elif "budgeted" in run:
            curve = sorted(run["budgeted"], key=lambda r: r["avg_macs"])
            macs = [r["avg_macs"] / scale for r in curve]
            (line,) = ax.plot(
                macs,
                [r["accuracy"] for r in curve],
                ("o-", "s-.", "^:")[lap % 3],
                color=color,
                markersize=3,
                label=run["label"],
            )
            if all("low" in r and "high" in r for r in curve):
                low, high = [r["low"] for r in curve], [r["high"] for r in curve]
                ax.fill_between(macs, low, high, color=line.get_color(), alpha=0.2, lw=0)
        else:
            macs, accuracy = run["point"]
            style = (
                {"color": "black", "markersize": 16}
                if run.get("reference")
                else {"color": color, "markersize": 12 if lap == 0 else 8}
            )
            ax.errorbar(
                [macs / scale],
                [accuracy],
                yerr=None if run.get("spread") is None else [run["spread"]],
                fmt="*" if run.get("reference") else ("*", "D", "s")[lap % 3],
                capsize=3,
                **{"markersize": 12, **style},
                label=run["label"] + (" (static reference)" if run.get("reference") else ""),
            )
    positive = [m for m in all_macs if m > 0]
    if positive and max(positive) > 10 * min(positive):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    title, ylabel = "budgeted batch classification", "test top-1 accuracy (%)"
    _finish(fig, ax, unit, title, ylabel, path, outside=len(runs) > 1, xlabel=x_label)


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


def _figure(wide: bool = False) -> tuple[Figure, Axes]:
    """A figure; `wide` leaves room on the right for a legend outside the axes."""
    fig = Figure(figsize=(9.5 if wide else 6, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _finish(
    fig: Figure,
    ax: Axes,
    unit: str,
    title: str,
    ylabel: str,
    path: str | Path,
    outside: bool = False,
    xlabel: str | None = None,
) -> None:
    """Label the axes (x: MACs, or `xlabel`), add the legend (`outside` the axes) and grid, and
    write the PNG (creating its folder)."""
    ax.set_xlabel(xlabel or (f"MACs per sample ({unit}MACs)" if unit else "MACs per sample"))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if outside:  # on the right of the data (a figure made wide for it)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    else:
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
