"""The one-screen summary printed at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def print_summary(results: dict[str, Any], run_dir: str | Path) -> None:
    """Names, size, cost and final metrics of a finished run, and where its outputs are."""
    table = Table(
        title=f"dynlab: {results.get('technique')} · {results.get('backbone')} · {results.get('dataset')}"
    )
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{results.get('params', 0) / 1e6:.3f} M")
    for k, macs in enumerate(results.get("exit_macs", []), start=1):
        table.add_row(f"MACs to exit {k}", f"{macs / 1e6:.2f} M")
    for name, value in sorted(results.get("metrics", {}).items()):
        table.add_row(name, f"{value:.2f}")
    console = Console()
    console.print(table)
    console.print(f"run dir: {run_dir}  (results.json, plots/, checkpoints/, wandb/)")
