"""The checkpointed ledger of a search: every evaluated candidate with its score, plus the state
the search needs to resume (a controller, a sampler's RNG, the candidates pending).

Saved atomically by rank 0 after every round of candidates: `<name>.pt` holds everything and
`<records>.json` the records, readable while the search runs. A search reloads it and evaluates
only the candidates whose index is not in it yet.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from dynlab.checkpointing import atomic_torch_save
from dynlab.data.sampling import rank_and_world_size
from dynlab.results import atomic_write_text

STATE, RECORDS = "search_state.pt", "candidates.json"


class Ledger:
    """Records (one dict per candidate, with its `index`) and the search's own `state` dict."""

    def __init__(self, directory: str | Path, state: str = STATE, records: str = RECORDS) -> None:
        self.directory = Path(directory)
        self.path, self.records_path = self.directory / state, self.directory / records
        self.records: list[dict[str, Any]] = []
        self.state: dict[str, Any] = {}

    def load(self) -> bool:
        """Read the saved ledger if there is one; whether there was."""
        if not self.path.exists():
            return False
        saved = torch.load(self.path, map_location="cpu", weights_only=False)
        self.records, self.state = saved["records"], saved["state"]
        return True

    def done(self) -> set[int]:
        """Indices of the candidates evaluated so far."""
        return {record["index"] for record in self.records}

    def add(self, records: Iterable[dict[str, Any]]) -> None:
        """Add records (each with a new `index`); the ledger stays ordered by index."""
        done = self.done()
        for record in records:
            if record["index"] in done:
                raise ValueError(f"candidate {record['index']} is already in the ledger")
            self.records.append(record)
        self.records.sort(key=lambda record: record["index"])

    def save(self) -> None:
        """Write the ledger atomically (rank 0 only: every rank holds the same one)."""
        if rank_and_world_size()[0] != 0:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"records": self.records, "state": self.state}, self.path)
        atomic_write_text(self.records_path, json.dumps(self.records, indent=2))
