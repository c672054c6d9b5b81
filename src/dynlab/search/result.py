"""A search's outcome as a JSON file (`search_result.json` in the search phase's folder): what a
later run retrains from (`technique.arch_file=...`, `technique.choices_file=...`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dynlab.data.sampling import rank_and_world_size
from dynlab.results import atomic_write_text

RESULT = "search_result.json"


def write_result(phase_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Write `summary` atomically as the phase's search_result.json (rank 0 only); its path."""
    path = Path(phase_dir) / RESULT
    if rank_and_world_size()[0] == 0:
        atomic_write_text(path, json.dumps(summary, indent=2))
    return path


def read_result(path: str | Path, key: str, option: str) -> Any:
    """Field `key` of a search result file given as `option`; ValueError naming the option when
    the file is missing or is no search result."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"{option}={path}: no such file (a search writes checkpoints/<phase>/{RESULT})"
        )
    try:
        return json.loads(path.read_text())[key]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{option}={path}: not a search result with '{key}' ({err})") from err
