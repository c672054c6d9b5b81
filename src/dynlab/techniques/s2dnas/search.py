"""The S2DNAS search loop: sample settings, train and score each candidate, update the controller.

Every iteration samples `candidates_per_iteration` settings from the controller, trains each sampled
network briefly, scores it on val (see `reward.py`) and takes one REINFORCE step. Under an initialised
torch.distributed, the candidates of an iteration are spread over the ranks (rank r takes the r-th
of each round of W) and the results all-gathered, so every rank keeps an identical controller.
After every round, the controller, its optimiser and baseline, the sampling RNG, the pending samples
and every evaluated candidate are saved atomically to `search_state.pt` (and the candidates to
`candidates.json`): a killed search resumes at the next candidate and samples what the uninterrupted
search would have. Candidate k is trained from seed (search seed, k), so it does not depend on when
or where it runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dynlab.checkpointing import atomic_torch_save
from dynlab.config import OptimConfig
from dynlab.data.sampling import rank_and_world_size
from dynlab.evaluation.outputs import collect_exit_probs
from dynlab.results import atomic_write_text
from dynlab.techniques.s2dnas.candidate import CandidateData, train_candidate
from dynlab.techniques.s2dnas.config import S2DNASSearchConfig
from dynlab.techniques.s2dnas.controller import Controller, Reinforce
from dynlab.techniques.s2dnas.reward import dynamic_score, reward
from dynlab.techniques.s2dnas.settings import S2DSettings

SEARCH_STATE, CANDIDATES = "search_state.pt", "candidates.json"
# Independent seed streams derived from the technique's seed (see `derived_seed`).
CANDIDATE_STREAM, SAMPLING_STREAM, CONTROLLER_STREAM, RETRAIN_STREAM = range(4)

Evaluate = Callable[[S2DSettings, int], dict[str, Any]]


def derived_seed(seed: int, *keys: int) -> int:
    """An independent seed for the stream named by `keys` (e.g. candidate k: keys (0, k))."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


@dataclass
class CandidateEvaluator:
    """Builds, briefly trains and scores one candidate; returns its record (settings, score, reward)."""

    build: Callable[[S2DSettings], nn.Module]
    data: CandidateData
    optim: OptimConfig
    loss_weights: list[float]
    input_size: tuple[int, int, int]
    static_macs: float
    cfg: S2DNASSearchConfig
    seed: int
    device: torch.device

    def __call__(self, settings: S2DSettings, index: int) -> dict[str, Any]:
        seed = derived_seed(self.seed, CANDIDATE_STREAM, index)
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.build(settings)
            train_candidate(
                model,
                self.data,
                self.optim,
                self.loss_weights,
                self.cfg.candidate_epochs,
                self.cfg.candidate_batches,
                seed,
                self.device,
            )
        probs, targets = collect_exit_probs(model, self.data.val_loader(), gather=False)
        exit_macs = model.exit_macs(self.input_size)  # type: ignore[operator]
        score = dynamic_score(probs, targets, exit_macs, self.static_macs, self.cfg)
        return {
            "settings": settings.to_dict(),
            "reward": reward(score, self.cfg),
            **score.as_dict(),
            "exit_macs": exit_macs,
            "seconds": time.perf_counter() - start,
        }


@dataclass
class SearchState:
    """Everything a resumed search needs (saved after every round of candidates)."""

    reinforce: dict[str, Any]
    generator: torch.Tensor
    updates: int = 0
    pending: list[list[int]] | None = None  # tokens sampled for the current iteration
    candidates: list[dict[str, Any]] = field(default_factory=list)


def run_search(
    controller: Controller,
    reinforce: Reinforce,
    evaluate: Evaluate,
    cfg: S2DNASSearchConfig,
    phase_dir: Path,
    seed: int,
) -> list[dict[str, Any]]:
    """Run (or resume) the search in `phase_dir`; every evaluated candidate's record, in order."""
    rank, world = rank_and_world_size()
    generator = torch.Generator().manual_seed(derived_seed(seed, SAMPLING_STREAM))
    state = _load(phase_dir, reinforce, generator)
    if world > 1:
        dist.barrier()  # every rank has read the state before rank 0 writes it again
    per_iteration = cfg.candidates_per_iteration
    while state.updates < cfg.iterations:
        if state.pending is None:
            state.pending = [controller.sample(generator) for _ in range(per_iteration)]
            state.generator = generator.get_state()
            _save(phase_dir, state, reinforce, rank)
        first = state.updates * per_iteration
        done = {c["index"] for c in state.candidates}
        todo = [j for j in range(per_iteration) if first + j not in done]
        for start in range(0, len(todo), world):
            batch = todo[start : start + world]
            record = None
            if rank < len(batch):
                j = batch[rank]
                record = evaluate(controller.to_settings(state.pending[j]), first + j)
                record.update(index=first + j, iteration=state.updates, tokens=state.pending[j])
            for result in _all_gather(record, world):
                if result is not None:
                    state.candidates.append(result)
            state.candidates.sort(key=lambda c: c["index"])
            _save(phase_dir, state, reinforce, rank)
        rewards = [c["reward"] for c in state.candidates[first : first + per_iteration]]
        reinforce.update(state.pending, rewards)
        state.updates, state.pending = state.updates + 1, None
        _save(phase_dir, state, reinforce, rank)
    return state.candidates


def top_candidates(candidates: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The `k` best distinct settings by reward (earlier candidates win ties)."""
    best: dict[str, dict[str, Any]] = {}
    for c in sorted(candidates, key=lambda c: (-c["reward"], c["index"])):
        best.setdefault(json.dumps(c["settings"]), c)
    return list(best.values())[:k]


def _load(phase_dir: Path, reinforce: Reinforce, generator: torch.Generator) -> SearchState:
    path = phase_dir / SEARCH_STATE
    if not path.exists():
        return SearchState(reinforce=reinforce.state_dict(), generator=generator.get_state())
    saved = torch.load(path, map_location="cpu", weights_only=False)
    state = SearchState(**saved)
    reinforce.load_state_dict(state.reinforce)
    generator.set_state(state.generator)
    return state


def _save(phase_dir: Path, state: SearchState, reinforce: Reinforce, rank: int) -> None:
    if rank != 0:
        return
    state.reinforce = reinforce.state_dict()
    atomic_torch_save(vars(state), phase_dir / SEARCH_STATE)
    atomic_write_text(phase_dir / CANDIDATES, json.dumps(state.candidates, indent=2))


def _all_gather(record: dict[str, Any] | None, world: int) -> list[dict[str, Any] | None]:
    if world == 1:
        return [record]
    gathered: list[dict[str, Any] | None] = [None] * world
    dist.all_gather_object(gathered, record)
    return gathered
