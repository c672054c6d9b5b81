"""`results.json` of a run dir: one JSON document that several writers update section by section.

Writes are atomic (temp file + rename) so a killed run never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dynlab.atomic import atomic_open
from dynlab.errors import ResultsError

RESULTS_FILE = "results.json"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (temp file + rename)."""
    with atomic_open(path) as f:
        f.write(text)


def read_results(run_dir: str | Path) -> dict[str, Any]:
    """The results of a run dir, or an empty dict when it has none yet; `ResultsError` when the
    file is not a JSON object (edited by hand, or written by something else than dynlab)."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path} is not valid JSON ({err}); move it aside to rerun") from err
    if not isinstance(doc, dict):
        raise ResultsError(f"{path} holds a JSON {type(doc).__name__}, not an object")
    return doc


def update_results(run_dir: str | Path, **sections: Any) -> dict[str, Any]:
    """Merge `sections` (top-level keys) into the run's results.json and return the whole document."""
    doc = read_results(run_dir)
    doc.update(json_safe(sections))
    text = json.dumps(doc, indent=2, default=_jsonable, allow_nan=False)
    atomic_write_text(Path(run_dir) / RESULTS_FILE, text)
    return doc


def json_safe(obj: Any) -> Any:
    """Strict JSON has no infinities: a threshold nobody reaches is written as the string "inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # tensors and numpy arrays
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
