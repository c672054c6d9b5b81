"""The one-screen summary printed at the end of a run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def print_summary(results: dict[str, Any], run_dir: str | Path) -> None:
    """Names, size, dynlab's measured MACs per exit and final metrics of a finished run, and
    where its outputs are."""
    table = Table(
        title=f"dynlab: {results.get('technique')} · {results.get('backbone')} · {results.get('dataset')}"
    )
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("parameters", _number(results.get("params"), 1e6, "M", 3))
    for k, macs in enumerate(results.get("exit_macs") or [], start=1):
        table.add_row(f"MACs to exit {k}", _number(macs, 1e6, "M", 2))
    for name, value in sorted((results.get("metrics") or {}).items()):
        table.add_row(name, _number(value))
    console = Console()
    console.print(table)
    console.print(f"run dir: {run_dir}  (results.json, plots/, checkpoints/, wandb/)")
    if any((Path(run_dir) / "wandb").glob("offline-run-*")):
        console.print(
            f"W&B offline runs: upload with  wandb sync {run_dir}/wandb/offline-run-*",
            soft_wrap=True,
        )


def _number(value: Any, scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
    """A number for the table; a missing value or a non-finite one (results.json writes NaN and
    inf as strings) is shown as it is instead of failing the whole summary."""
    try:
        number = float(value) / scale
    except (TypeError, ValueError):
        return "–" if value is None else str(value)
    if not math.isfinite(number):
        return str(number)
    return f"{number:.{digits}f}{f' {unit}' if unit else ''}"
