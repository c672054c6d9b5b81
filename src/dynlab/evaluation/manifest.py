"""An export's manifest.json (dynlab.evaluation.export), read without torch: the apps check a
folder is an export before anything heavy loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dynlab.errors import ExportError
from dynlab.results import atomic_write_text, json_safe

MANIFEST = "manifest.json"
FORMAT = 1


def write_manifest(directory: Path, record: dict[str, Any]) -> None:
    """Strict JSON, an unreachable threshold as "inf" (as in results.json)."""
    atomic_write_text(directory / MANIFEST, json.dumps(json_safe(record), indent=2) + "\n")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an export directory; ExportError when there is none or it is unreadable."""
    path = Path(directory) / MANIFEST
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"{path}: no readable export manifest ({err})") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        raise ExportError(f"{path}: export format {found}, this dynlab reads {FORMAT}")
    return record
