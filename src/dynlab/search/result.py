"""A search's outcome as a JSON file (`search_result.json` in the search phase's folder), the same
shape for every search: `search` (the technique), `architecture` (what a retrain builds: SPOS's
genes, FBNetV2's choices, S2DNAS's settings) and the search's own fields. A later run retrains
from it (`technique.architecture_file=...`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynlab.data.sampling import rank_and_world_size
from dynlab.results import atomic_write_text

RESULT, ARCHITECTURE = "search_result.json", "architecture"
# Where results written by earlier dynlab versions kept the architecture (SPOS, FBNetV2).
_OLD_KEYS = ("genes", "choices")


def write_result(phase_dir: str | Path, result: Mapping[str, Any]) -> Path:
    """Write `result` (with `search` and `architecture`) atomically as the phase's
    search_result.json (rank 0 only); its path."""
    missing = {"search", ARCHITECTURE} - result.keys()
    if missing:
        raise ValueError(f"a search result needs {sorted(missing)}")
    path = Path(phase_dir) / RESULT
    if rank_and_world_size()[0] == 0:
        atomic_write_text(path, json.dumps(result, indent=2))
    return path


def read_architecture(path: str | Path, option: str) -> Any:
    """The architecture of a search result file given as `option`; ValueError naming the option
    when the file is missing or is no search result."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"{option}={path}: no such file (a search writes checkpoints/<phase>/{RESULT})"
        )
    try:
        result = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{option}={path}: not JSON ({err})") from err
    for key in (ARCHITECTURE, *_OLD_KEYS):
        if isinstance(result, dict) and key in result:
            return result[key]
    keys = sorted(result) if isinstance(result, dict) else type(result).__name__
    raise ValueError(f"{option}={path}: not a search result: no '{ARCHITECTURE}' among {keys}")
