"""One driver for every search: a search supplies how to propose candidates and how to score one;
the driver owns everything else.

A search runs in rounds (S2DNAS: a controller iteration, SPOS: a generation). Each round the
driver asks `Search.propose` for the round's candidates (JSON-able dicts, drawn from the driver's
RNG and the records so far), has every candidate scored by `Search.score` where the run puts
candidates (in this process, spread over the job's ranks, or as one Slurm job array a round), and
hands the scored round to `Search.update` (a controller's step). What the driver owns:

- the `Ledger`: every record (the candidate, its score, `index`, `round`, and the `rank` or
  `slurm_job` that ran it) and the state, saved atomically after every candidate round;
- the identity check: a resumed ledger of another search (space, data, settings, seed) is refused
  in one line naming what differs, before any candidate runs;
- the RNG: one numpy and one torch Generator from (seed, PROPOSAL_STREAM), saved with the ledger,
  and torch's global RNG seeded from (seed, CANDIDATE_STREAM, k) around candidate k's score, so a
  record depends on its index only, not on when or where it ran;
- where candidates run (`CandidatesOn`); preemption at candidate boundaries (a Slurm signal stops
  the search after the ledger is saved; the resumed search goes on with the next candidate);
- `search_result.json` (`write_result`) from `Search.result`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from dynlab.config import CandidatesOn
from dynlab.data.sampling import rank_and_world_size
from dynlab.errors import ConfigError, SearchMismatch
from dynlab.search.array import ArrayConfig, evaluate_array, hydra_slurm_launcher
from dynlab.search.ledger import Ledger
from dynlab.search.ranks import evaluate_spread
from dynlab.search.result import write_result
from dynlab.search.seeds import derived_seed, seeded

__all__ = [
    "ARRAY_FOLDER",
    "CANDIDATE_STREAM",
    "PROPOSAL_STREAM",
    "NoCandidates",
    "Outcome",
    "Search",
    "SearchDriver",
    "SearchRNG",
    "data_identity",
    "for_array_task",
    "search_identity",
    "settings_identity",
]

log = logging.getLogger(__name__)

# The driver's seed streams (`derived_seed(seed, stream, ...)`); a technique's own start at 2
# (SPOS keeps 0 for its supernet's paths, from before the driver: its scores draw nothing).
CANDIDATE_STREAM, PROPOSAL_STREAM = 0, 1
ARRAY_FOLDER = ".submitit"  # submitit's files and the array tasks' logs, in the phase dir
# Fields the driver writes into every record; neither a candidate nor a score may hold them.
RESERVED = frozenset({"index", "round", "rank", "slurm_job"})
Record = dict[str, Any]


class NoCandidates(Exception):
    """Raised by `Search.propose` when no new legal candidate can be drawn: the search stops
    early and its result says why (the exception's message)."""


@dataclass
class SearchRNG:
    """The proposals' random streams: numpy's (evolution) and torch's (a controller's sampling),
    both from the same seed, saved in the ledger so a resumed search draws what an uninterrupted
    one would have."""

    numpy: np.random.Generator
    torch: torch.Generator

    @classmethod
    def from_seed(cls, seed: int) -> SearchRNG:
        return cls(np.random.default_rng(seed), torch.Generator().manual_seed(seed))

    def state(self) -> dict[str, Any]:
        return {"numpy": self.numpy.bit_generator.state, "torch": self.torch.get_state()}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.numpy.bit_generator.state = state["numpy"]
        self.torch.set_state(state["torch"])


class Search(ABC):
    """What a search supplies to the driver: its identity, how to propose a round of candidates,
    how to score one, and (optionally) what it learns from a scored round and its own state."""

    name: ClassVar[str]  # in messages, records and search_result.json
    round_name: ClassVar[str] = "round"  # what a round is called in messages ("generation")

    @property
    @abstractmethod
    def rounds(self) -> int:
        """How many rounds the search runs (a resumed search may be given more)."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What makes a resumed ledger this search's: its space, data and settings (JSON-able;
        not the run length, so a finished search can be extended)."""

    @abstractmethod
    def propose(self, rng: SearchRNG, records: Sequence[Record]) -> list[dict[str, Any]]:
        """The next round's candidates, drawn from `rng` and the `records` scored so far only
        (never from where or when anything ran); `NoCandidates` when none can be drawn."""

    @abstractmethod
    def score(self, candidate: Mapping[str, Any], index: int) -> dict[str, Any]:
        """Candidate `index`'s score: the fields its record adds to the candidate. Runs where the
        driver puts it, a Slurm array task included, so the search must pickle (`for_task`)."""

    @abstractmethod
    def result(self, records: Sequence[Record]) -> dict[str, Any]:
        """The outcome for search_result.json: `architecture` (what a retrain builds) and the
        search's own fields."""

    def update(self, records: Sequence[Record]) -> None:
        """Learn from one scored round (its records, by index); nothing by default."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The search's own state beyond the records (a controller and its optimiser)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`'s state on resume."""
        return None

    def for_task(self) -> Search:
        """This search as a Slurm array task gets it: what stays with the controller process (a
        Trainer, a rank's device) left out. Itself by default."""
        return self

    def gpus_per_task(self) -> int:
        """GPUs one candidate needs in a Slurm array task."""
        return 0


@dataclass(frozen=True)
class Outcome:
    """A finished search: every record by index, search_result.json's content and its path, and
    why it stopped before its last round (None when it ran them all)."""

    records: list[Record]
    result: dict[str, Any]
    path: Path
    stopped: str | None


def data_identity(datamodule: Any) -> dict[str, Any]:
    """The part of a search's identity that fixes its data: dataset, input size, classes, the
    held-out split (size and seed), the train subset, the batch size and augmentation."""
    info = datamodule.info
    return {
        "dataset": info.name,
        "input_size": list(info.input_size),
        "num_classes": info.num_classes,
        "val_size": datamodule.val_size,
        "split_seed": datamodule.seed,
        "train_subset": datamodule.train_subset,
        "batch_size": datamodule.batch_size,
        "augment": datamodule.augment,
    }


def search_identity(
    space: Mapping[str, Any], data: Mapping[str, Any], settings: Any, *leave_out: str
) -> dict[str, Any]:
    """A search's identity in the shape every search uses: its space, its data and its settings
    (`settings_identity` of its config dataclass without `leave_out`)."""
    return {
        "space": dict(space),
        "data": dict(data),
        "settings": settings_identity(settings, *leave_out),
    }


def settings_identity(settings: Any, *leave_out: str) -> dict[str, Any]:
    """A search's settings (a config dataclass) as plain values for its identity, without the
    fields `leave_out` that change neither its proposals nor its scores (its length, ...)."""
    plain = json.loads(json.dumps(dataclasses.asdict(settings), default=str))
    return {key: value for key, value in plain.items() if key not in leave_out}


@dataclass
class SearchDriver:
    """Runs (or resumes) `search` in `phase_dir` with candidates placed by `candidates_on`
    (`array` overrides the job array's settings, which otherwise come from the run's
    `hydra/launcher=slurm`)."""

    search: Search
    phase_dir: Path
    seed: int
    candidates_on: CandidatesOn = CandidatesOn.auto
    array: ArrayConfig | None = None

    def run(self) -> Outcome:
        search, phase_dir = self.search, Path(self.phase_dir)
        rng = SearchRNG.from_seed(derived_seed(self.seed, PROPOSAL_STREAM))
        identity = {"search": search.name, "seed": int(self.seed), **search.identity()}
        ledger = Ledger(phase_dir)
        if ledger.load():
            _check_same_search(ledger.state.get("identity"), identity, search.name, phase_dir)
            rng.restore(ledger.state["rng"])
            search.load_state_dict(ledger.state["search"])
        else:
            ledger.state = {
                "identity": identity,
                "round": 0,
                "first": 0,  # index of the pending round's first candidate
                "pending": None,
                "rng": rng.state(),
                "search": search.state_dict(),
                "stopped": None,
            }
        state, array = ledger.state, self._array_config(search)
        task = search if array is None else search.for_task()
        while state["round"] < search.rounds and state["stopped"] is None:
            if state["pending"] is None:
                try:
                    pending = search.propose(rng, ledger.records)
                    if not pending:
                        raise NoCandidates("it proposed no candidate")
                except NoCandidates as stop:
                    state["stopped"] = f"{search.round_name} {state['round']}: {stop}"
                    log.warning("%s search stopped early: %s", search.name, state["stopped"])
                    ledger.save()
                    break
                _check_proposal(search, pending)
                state["pending"], state["first"] = pending, len(ledger.records)
                state["rng"], state["search"] = rng.state(), search.state_dict()
                ledger.save()
            first, pending, done = state["first"], state["pending"], ledger.done()
            todo = [first + j for j in range(len(pending)) if first + j not in done]
            score = partial(_score, task, pending, first, state["round"], self.seed)
            if array is None:
                evaluate_spread(todo, score, ledger)
            else:
                evaluate_array(todo, score, ledger, array)
            scored = ledger.records[first : first + len(pending)]
            if [r["index"] for r in scored] != list(range(first, first + len(pending))):
                raise RuntimeError(
                    f"{search.name} search: the ledger in {phase_dir} misses candidates"
                )
            search.update(scored)
            state["round"], state["pending"] = state["round"] + 1, None
            state["search"] = search.state_dict()
            ledger.save()
        if not ledger.records:
            raise RuntimeError(f"{search.name} search scored no candidate: {state['stopped']}")
        result = {
            "search": search.name,
            **search.result(ledger.records),
            "evaluated": len(ledger.records),
            "stopped": state["stopped"],
        }
        path = write_result(phase_dir, result)
        return Outcome(ledger.records, result, path, state["stopped"])

    def _array_config(self, search: Search) -> ArrayConfig | None:
        """The job array's settings when the candidates go to one; None: in this job."""
        on, world = CandidatesOn(self.candidates_on), rank_and_world_size()[1]
        if on == CandidatesOn.ranks:
            return None
        if on == CandidatesOn.auto:
            if hydra_slurm_launcher() is None and self.array is None:
                return None
            if world > 1:
                log.info("%s search: candidates over the job's %d ranks", search.name, world)
                return None
        if world > 1:
            raise ConfigError(
                f"{search.name} search: a job array of candidates needs a one-process controller, "
                f"this job has {world} ranks (trainer.devices=1, or candidates_on=ranks)"
            )
        if self.array is not None:
            return self.array
        folder = Path(self.phase_dir) / ARRAY_FOLDER
        return ArrayConfig.from_hydra(folder, gpus_per_task=search.gpus_per_task())


def _check_proposal(search: Search, pending: Sequence[Mapping[str, Any]]) -> None:
    """A proposal's candidates must not hold the fields the driver writes."""
    clash = RESERVED & {key for candidate in pending for key in candidate}
    if clash:
        raise ValueError(f"{search.name} search: propose returned reserved fields {sorted(clash)}")


def for_array_task(datamodule: Any) -> Any:
    """A copy of `datamodule` for a Slurm array task: without the controller's Trainer and without
    its loaded splits (the task loads the same seeded splits itself, so they are not pickled)."""
    task = copy.copy(datamodule)
    task.trainer, task.splits = None, None
    return task


def _score(
    search: Search,
    pending: Sequence[Mapping[str, Any]],
    first: int,
    round_: int,
    seed: int,
    index: int,
) -> Record:
    """Candidate `index` of the round whose candidates `pending` start at `first`, scored under
    its own seed; its record (the driver adds `index` and where it ran)."""
    candidate = pending[index - first]
    with seeded(derived_seed(seed, CANDIDATE_STREAM, index)):
        score = search.score(candidate, index)
    clash = (RESERVED | candidate.keys()) & score.keys()
    if clash:
        raise ValueError(f"{search.name} search: score returned reserved fields {sorted(clash)}")
    return {**candidate, **score, "round": round_}


def _check_same_search(
    saved: Mapping[str, Any] | None, identity: Mapping[str, Any], name: str, phase_dir: Path
) -> None:
    """Refuse, in one line naming what differs, a ledger another search wrote."""
    if saved == identity:
        return
    if saved is None or "search" not in saved:  # no identity, or an earlier version's
        raise SearchMismatch(
            f"{name} search: the ledger in {phase_dir} was written by an older dynlab, without "
            "the identity of its search; start the search in a new run directory"
        )
    differ = [
        f"{key}: {_short(there)} there, {_short(here)} here"
        for key, there, here in _differing(saved, identity)
    ]
    raise SearchMismatch(
        f"{name} search: the ledger in {phase_dir} belongs to another search ({'; '.join(differ)}); "
        "resume it with the settings it was started with, or use a new run directory"
    )


def _differing(
    a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in `a`, value in `b`) wherever two nested dicts differ."""
    found: list[tuple[str, Any, Any]] = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            found += _differing(x, y, f"{prefix}{key}.")
        elif x != y:
            found.append((f"{prefix}{key}", x, y))
    return found


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
