"""The S2DNAS search loop: sample settings, train and score each candidate, update the controller.

Every iteration samples `candidates_per_iteration` settings from the controller, trains each
sampled network briefly, scores it on val (see `reward.py`) and takes one REINFORCE step. The
shared machinery is `dynlab.search`: candidates train on the datamodule's real train loader
(`train_candidate`), are spread over the ranks of the job with the records all-gathered, so every
rank keeps an identical controller, and go into a `Ledger` saved after every round together with
the controller, its optimiser and baseline, the sampling RNG and the pending samples: a killed or
preempted search resumes at the next candidate and samples what the uninterrupted search would
have. Candidate k is initialised from seed (search seed, k), so it does not depend on when or
where it runs.

When the search was launched with `hydra/launcher=slurm` (or `run_search(array=...)` asks for
it), a one-process controller sends each iteration's candidates out as one Slurm job array
(`dynlab.search.array`, settings from the launcher's) and their records come back into the same
ledger; lost tasks are resubmitted. A controller with several ranks spreads them over its ranks.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynlab.config import OptimConfig
from dynlab.data.base import DynlabDataModule, StreamSpec
from dynlab.data.sampling import rank_and_world_size
from dynlab.search import (
    ArrayConfig,
    CandidateTrainer,
    Ledger,
    derived_seed,
    evaluate_array,
    evaluate_spread,
    seeded,
    train_candidate,
    val_exit_probs,
)
from dynlab.search.array import hydra_slurm_launcher
from dynlab.search.ledger import RECORDS, STATE
from dynlab.techniques.s2dnas.config import S2DNASSearchConfig
from dynlab.techniques.s2dnas.controller import Controller, Reinforce
from dynlab.techniques.s2dnas.model import multi_exit_loss
from dynlab.techniques.s2dnas.reward import dynamic_score, reward
from dynlab.techniques.s2dnas.settings import S2DSettings

__all__ = ["CANDIDATES", "SEARCH_STATE", "derived_seed", "run_search", "top_candidates"]

SEARCH_STATE, CANDIDATES = STATE, RECORDS
# Independent seed streams derived from the technique's seed (see `derived_seed`).
CANDIDATE_STREAM, SAMPLING_STREAM, CONTROLLER_STREAM, RETRAIN_STREAM = range(4)
# Every candidate trains on the whole train split, in the same seeded order (common random
# numbers: candidates differ by their settings and initialisation, not by their batches).
CANDIDATE_DATA = StreamSpec("s2dnas/candidates", sharded=False)

Evaluate = Callable[[S2DSettings, int], dict[str, Any]]
ARRAY_FOLDER = ".submitit"  # submitit's files and the array tasks' logs, in the phase dir

log = logging.getLogger(__name__)


@dataclass
class CandidateEvaluator:
    """Builds, briefly trains and scores one candidate; returns its record (settings, score, reward)."""

    build: Callable[[S2DSettings], nn.Module]
    datamodule: DynlabDataModule
    optim: OptimConfig
    loss_weights: list[float]
    input_size: tuple[int, int, int]
    static_macs: float
    cfg: S2DNASSearchConfig
    seed: int
    trainer: CandidateTrainer

    def __call__(self, settings: S2DSettings, index: int) -> dict[str, Any]:
        start = time.perf_counter()
        with seeded(derived_seed(self.seed, CANDIDATE_STREAM, index)):
            model = self.build(settings)
            train_candidate(
                model,
                self._loss,
                self.optim,
                self.datamodule.stream_loader(CANDIDATE_DATA),
                self.cfg.candidate_epochs,
                self.cfg.candidate_batches,
                self.trainer,
            )
        probs, targets = val_exit_probs(model, self.datamodule.whole_val_loader())
        exit_macs = model.exit_macs(self.input_size)  # type: ignore[operator]
        score = dynamic_score(probs, targets, exit_macs, self.static_macs, self.cfg)
        return {
            "settings": settings.to_dict(),
            "reward": reward(score, self.cfg),
            **score.as_dict(),
            "exit_macs": exit_macs,
            "seconds": time.perf_counter() - start,
        }

    def _loss(self, logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return multi_exit_loss(logits, y, self.loss_weights, self.optim.label_smoothing)


def run_search(
    controller: Controller,
    reinforce: Reinforce,
    evaluate: Evaluate,
    cfg: S2DNASSearchConfig,
    phase_dir: Path,
    seed: int,
    array: ArrayConfig | bool | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the search in `phase_dir`; every evaluated candidate's record, in order.

    `array`: each iteration's candidates as one Slurm job array (True: settings from the run's
    `hydra/launcher=slurm`, else submitit's defaults; or an `ArrayConfig`), or in this job
    (False: over its ranks). None (default): an array when the run was launched with
    `hydra/launcher=slurm` and this job has one rank.
    """
    array_cfg = _array_config(array, evaluate, Path(phase_dir))
    task_evaluate = evaluate if array_cfg is None else _for_array_task(evaluate)
    generator = torch.Generator().manual_seed(derived_seed(seed, SAMPLING_STREAM))
    ledger = Ledger(phase_dir)
    if ledger.load():
        reinforce.load_state_dict(ledger.state["reinforce"])
        generator.set_state(ledger.state["generator"])
    else:
        ledger.state = {"updates": 0, "pending": None}
    state = ledger.state

    def keep_state() -> None:
        state["reinforce"], state["generator"] = reinforce.state_dict(), generator.get_state()

    per_iteration = cfg.candidates_per_iteration
    while state["updates"] < cfg.iterations:
        if state["pending"] is None:
            state["pending"] = [controller.sample(generator) for _ in range(per_iteration)]
            keep_state()
            ledger.save()
        first, done = state["updates"] * per_iteration, ledger.done()
        todo = [first + j for j in range(per_iteration) if first + j not in done]
        pending = state["pending"]
        if array_cfg is None:
            sampled = partial(_evaluate_sampled, evaluate, controller, pending, first)
            evaluate_spread(todo, sampled, ledger, on_round=keep_state)
        else:
            sampled = partial(_evaluate_sampled, task_evaluate, controller, pending, first)
            evaluate_array(todo, sampled, ledger, array_cfg, on_round=keep_state)
        rewards = [c["reward"] for c in ledger.records[first : first + per_iteration]]
        reinforce.update(state["pending"], rewards)
        state["updates"], state["pending"] = state["updates"] + 1, None
        keep_state()
        ledger.save()
    return ledger.records


def _array_config(
    array: ArrayConfig | bool | None, evaluate: Evaluate, phase_dir: Path
) -> ArrayConfig | None:
    """The job array settings `run_search(array=...)` asks for; None: candidates in this job."""
    world = rank_and_world_size()[1]
    if array is None:
        if hydra_slurm_launcher() is None:
            return None
        if world > 1:
            log.info("s2dnas search: candidates over the job's %d ranks, not a job array", world)
            return None
        array = True
    if array is False:
        return None
    if world > 1:
        raise ValueError(
            f"s2dnas search: a job array of candidates needs a one-process controller, this job "
            f"has {world} ranks (trainer.devices=1, or candidates over the ranks)"
        )
    if isinstance(array, ArrayConfig):
        return array
    trainer = getattr(evaluate, "trainer", None)
    gpus = 1 if isinstance(trainer, CandidateTrainer) and trainer.accelerator == "gpu" else 0
    return ArrayConfig.from_hydra(phase_dir / ARRAY_FOLDER, gpus_per_task=gpus)


def _for_array_task(evaluate: Evaluate) -> Evaluate:
    """`evaluate` as an array task runs it: on the task's one GPU (index 0), and without the
    controller's Trainer attached to the datamodule (it stays in the controller's process)."""
    if not isinstance(evaluate, CandidateEvaluator):
        return evaluate
    datamodule = copy.copy(evaluate.datamodule)
    datamodule.trainer = None
    return replace(
        evaluate, datamodule=datamodule, trainer=replace(evaluate.trainer, device_index=0)
    )


def _evaluate_sampled(
    evaluate: Evaluate, controller: Controller, pending: list[list[int]], first: int, index: int
) -> dict[str, Any]:
    """Candidate `index` of an iteration whose samples `pending` start at index `first`."""
    tokens = pending[index - first]
    record = evaluate(controller.to_settings(tokens), index)
    return {**record, "iteration": first // len(pending), "tokens": tokens}


def top_candidates(candidates: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The `k` best distinct settings by reward (earlier candidates win ties)."""
    best: dict[str, dict[str, Any]] = {}
    for c in sorted(candidates, key=lambda c: (-c["reward"], c["index"])):
        best.setdefault(json.dumps(c["settings"]), c)
    return list(best.values())[:k]
