"""The search driver on a toy search (no networks): a search killed at any candidate boundary
resumes and ends as an uninterrupted one (records, result, the search's own state, each candidate
scored once), a ledger of another search is refused in one line before anything is scored, a
search that runs out of candidates stops and says why, and a finished search can be extended."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from dynlab.errors import SearchMismatch, UserError
from dynlab.search import RESULT, Ledger, derived_seed, seeded
from dynlab.search.driver import (
    CANDIDATE_STREAM,
    NoCandidates,
    Search,
    SearchDriver,
    SearchRNG,
)

CHOICES, PER_ROUND, ROUNDS = 6, 3, 4


class Killed(Exception):
    pass


class Toy(Search):
    """Candidates are pairs (a, b) in range(CHOICES)^2 drawn from both of the driver's generators;
    a score mixes them with torch's global RNG (the driver seeds it per candidate), and every round
    moves a running `total` (the search's own state), which steers the next round's draws."""

    name = "toy"

    def __init__(
        self,
        rounds: int = ROUNDS,
        kill_at: int | None = None,
        kill_in_update: int | None = None,
        space: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        exhaust_after: int | None = None,
    ) -> None:
        self._rounds, self.kill_at, self.exhaust_after = rounds, kill_at, exhaust_after
        self.kill_in_update = kill_in_update
        self.space = dict(space or {"choices": CHOICES})
        self.data = dict(data or {"dataset": "digits", "val_size": 100})
        self.total = 0.0
        self.scored: list[int] = []

    @property
    def rounds(self) -> int:
        return self._rounds

    def identity(self) -> dict[str, Any]:
        return {"space": self.space, "data": self.data, "settings": {"per_round": PER_ROUND}}

    def propose(self, rng: SearchRNG, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.exhaust_after is not None and len(records) >= self.exhaust_after:
            raise NoCandidates("every candidate was seen")
        shift = int(self.total) % CHOICES
        a = rng.numpy.integers(0, CHOICES, size=PER_ROUND)
        b = torch.randint(0, CHOICES, (PER_ROUND,), generator=rng.torch)
        return [{"a": int((x + shift) % CHOICES), "b": int(y)} for x, y in zip(a, b, strict=True)]

    def score(self, candidate: Mapping[str, Any], index: int) -> dict[str, Any]:
        if index == self.kill_at:
            raise Killed
        self.scored.append(index)
        return {"value": candidate["a"] * 10 + candidate["b"] + float(torch.rand(()))}

    def update(self, records: Sequence[dict[str, Any]]) -> None:
        self.total += max(r["value"] for r in records)  # learnt before a kill inside update
        if records[0]["round"] == self.kill_in_update:
            raise Killed

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total = state["total"]

    def result(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        best = max(records, key=lambda r: r["value"])
        return {"architecture": [best["a"], best["b"]], "total": self.total}


def drive(search: Toy, phase_dir: Path, seed: int = 0) -> Any:
    return SearchDriver(search, phase_dir, seed).run()


@pytest.mark.parametrize("kill_at", range(PER_ROUND * ROUNDS))
def test_a_search_killed_at_any_candidate_resumes_as_an_uninterrupted_one(
    tmp_path: Path, kill_at: int
) -> None:
    whole = drive(Toy(), tmp_path / "whole")
    killed = Toy(kill_at=kill_at)
    with pytest.raises(Killed):
        drive(killed, tmp_path / "killed")
    assert killed.scored == list(range(kill_at))
    resumed = Toy()
    outcome = drive(resumed, tmp_path / "killed")
    assert resumed.scored == list(range(kill_at, PER_ROUND * ROUNDS))  # each scored once overall
    assert outcome.records == whole.records and outcome.result == whole.result
    assert [r["round"] for r in outcome.records] == [r // PER_ROUND for r in range(12)]
    saved = json.loads((tmp_path / "killed" / RESULT).read_text())
    assert (
        saved
        == {**whole.result, "stopped": None}
        == json.loads((tmp_path / "whole" / RESULT).read_text())
    )
    assert saved["search"] == "toy" and saved["evaluated"] == 12


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_search_killed_inside_its_update_resumes_as_an_uninterrupted_one(
    tmp_path: Path, round_: int
) -> None:
    """The update's learning is saved only with the round's end: a resumed search redoes it from
    the state saved with the proposal, and never scores a candidate twice."""
    whole = drive(Toy(), tmp_path / "whole")
    killed = Toy(kill_in_update=round_)
    with pytest.raises(Killed):
        drive(killed, tmp_path / "killed")
    resumed = Toy()
    outcome = drive(resumed, tmp_path / "killed")
    assert outcome.records == whole.records and outcome.result == whole.result
    assert sorted(killed.scored + resumed.scored) == list(range(PER_ROUND * ROUNDS))


def test_records_depend_on_the_seed_and_each_candidate_is_scored_under_its_own_seed(
    tmp_path: Path,
) -> None:
    one, two = drive(Toy(), tmp_path / "one", seed=0), drive(Toy(), tmp_path / "two", seed=1)
    assert [(r["a"], r["b"]) for r in one.records] != [(r["a"], r["b"]) for r in two.records]
    for r in one.records:  # torch's draw inside score is the one of the candidate's own seed
        with seeded(derived_seed(0, CANDIDATE_STREAM, r["index"])):
            draw = float(torch.rand(()))
        assert r["value"] == r["a"] * 10 + r["b"] + draw


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        ({"space": {"choices": 7}}, "space.choices: 6 there, 7 here"),
        ({"data": {"dataset": "fashion_mnist", "val_size": 100}}, "data.dataset: 'digits' there"),
        ({"data": {"dataset": "digits", "val_size": 50}}, "data.val_size: 100 there, 50 here"),
        ({"seed": 3}, "seed: 0 there, 3 here"),
    ],
)
def test_a_ledger_of_another_search_is_refused_in_one_line_before_anything_is_scored(
    tmp_path: Path, changed: dict[str, Any], named: str
) -> None:
    with pytest.raises(Killed):
        drive(Toy(kill_at=4), tmp_path)
    seed = changed.pop("seed", 0)
    other = Toy(**changed)
    with pytest.raises(SearchMismatch) as refused:
        drive(other, tmp_path, seed=seed)
    message = str(refused.value)
    assert isinstance(refused.value, UserError) and "\n" not in message
    assert message.startswith(f"toy search: the ledger in {tmp_path} belongs to another search")
    assert named in message and message.count(" there, ") == 1
    assert other.scored == []
    assert Ledger(tmp_path).load()  # the ledger is kept as it was
    assert [r["index"] for r in json.loads((tmp_path / "candidates.json").read_text())] == [
        0,
        1,
        2,
        3,
    ]


def test_a_ledger_without_an_identity_is_refused(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.state = {"updates": 1, "pending": None}
    ledger.save()
    with pytest.raises(SearchMismatch, match="written by an older dynlab"):
        drive(Toy(), tmp_path)


def test_a_search_out_of_candidates_stops_and_its_result_says_why(tmp_path: Path) -> None:
    outcome = drive(Toy(exhaust_after=6), tmp_path)
    assert len(outcome.records) == 6 and outcome.stopped == "round 2: every candidate was seen"
    assert json.loads((tmp_path / RESULT).read_text())["stopped"] == outcome.stopped
    with pytest.raises(RuntimeError, match="scored no candidate: round 0: every candidate"):
        drive(Toy(exhaust_after=0), tmp_path / "none")


def test_a_finished_search_given_more_rounds_goes_on_from_where_it_ended(tmp_path: Path) -> None:
    drive(Toy(rounds=2), tmp_path / "short")
    extended = Toy(rounds=ROUNDS)
    outcome = drive(extended, tmp_path / "short")
    assert extended.scored == list(range(2 * PER_ROUND, ROUNDS * PER_ROUND))
    assert outcome.records == drive(Toy(), tmp_path / "whole").records


class Empty(Toy):
    def propose(self, rng: SearchRNG, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return [] if records else super().propose(rng, records)


class ProposesReserved(Toy):
    def propose(self, rng: SearchRNG, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**c, "index": 0} for c in super().propose(rng, records)]


def test_an_empty_proposal_stops_the_search_and_a_reserved_field_is_refused(tmp_path: Path) -> None:
    assert drive(Empty(), tmp_path / "empty").stopped == "round 1: it proposed no candidate"
    with pytest.raises(ValueError, match=r"propose returned reserved fields \['index'\]"):
        drive(ProposesReserved(), tmp_path / "reserved")


class Reserved(Toy):
    def score(self, candidate: Mapping[str, Any], index: int) -> dict[str, Any]:
        return {"value": 1.0, "round": 7}


def test_a_score_may_not_overwrite_the_drivers_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"reserved fields \['round'\]"):
        drive(Reserved(), tmp_path)
