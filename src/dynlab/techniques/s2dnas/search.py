"""The S2DNAS search as the search driver runs it (`dynlab.search.driver`).

Every round (a controller iteration) proposes `candidates_per_iteration` settings sampled from the
controller with the driver's torch Generator; each candidate is built, trained briefly on the
datamodule's real train loader (`train_candidate`) and scored on val (see `reward.py`); the scored
round takes one REINFORCE step. The driver keeps the ledger (the controller, its optimiser and
baseline are the search's state), refuses a resumed ledger of another search, places the
candidates (this job's ranks, or one Slurm job array a round under `hydra/launcher=slurm`) and
seeds candidate k from (search seed, k), so its record does not depend on when or where it ran.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from dynlab.config import OptimConfig
from dynlab.data.base import DynlabDataModule, StreamSpec
from dynlab.search import CandidateTrainer, train_candidate, val_exit_probs
from dynlab.search.driver import Search, SearchRNG, for_array_task, search_identity
from dynlab.techniques.s2dnas.config import S2DNASSearchConfig
from dynlab.techniques.s2dnas.controller import Controller, Reinforce
from dynlab.techniques.s2dnas.model import multi_exit_loss
from dynlab.techniques.s2dnas.reward import dynamic_score, reward
from dynlab.techniques.s2dnas.settings import S2DSettings

__all__ = ["CandidateEvaluator", "ControllerSearch", "top_candidates"]

# Independent seed streams derived from the technique's seed (`derived_seed`): the driver's
# candidate (0) and proposal (1) streams, then the controller's initialisation and the retrains.
CONTROLLER_STREAM, RETRAIN_STREAM = 2, 3
# Every candidate trains on the whole train split, in the same seeded order (common random
# numbers: candidates differ by their settings and initialisation, not by their batches).
CANDIDATE_DATA = StreamSpec("s2dnas/candidates", sharded=False)
# Search settings that change neither which candidates are proposed nor their scores.
NOT_IDENTITY = ("iterations", "top_k", "retrain_epochs", "select_by", "require_static")
NOT_IDENTITY += ("candidates_on",)

Evaluate = Callable[[S2DSettings, int], dict[str, Any]]


@dataclass
class CandidateEvaluator:
    """Builds, briefly trains and scores one candidate (under the driver's seed for it); its
    score, reward and MACs."""

    build: Callable[[S2DSettings], nn.Module]
    datamodule: DynlabDataModule
    optim: OptimConfig
    loss_weights: list[float]
    input_size: tuple[int, int, int]
    static_macs: float
    cfg: S2DNASSearchConfig
    trainer: CandidateTrainer

    def __call__(self, settings: S2DSettings, index: int) -> dict[str, Any]:
        start = time.perf_counter()
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
            "reward": reward(score, self.cfg),
            **score.as_dict(),
            "exit_macs": exit_macs,
            "seconds": time.perf_counter() - start,
        }

    def _loss(self, logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return multi_exit_loss(logits, y, self.loss_weights, self.optim.label_smoothing)


class ControllerSearch(Search):
    """S2DNAS's policy-gradient search over split points and indicator matrices: proposes the
    controller's samples, scores each with `evaluate`, steps REINFORCE on the round's rewards."""

    name, round_name = "s2dnas", "iteration"

    def __init__(
        self,
        controller: Controller,
        reinforce: Reinforce,
        evaluate: Evaluate,
        cfg: S2DNASSearchConfig,
        space: Mapping[str, Any],
        data: Mapping[str, Any],
    ) -> None:
        self.controller, self.reinforce = controller, reinforce
        self.evaluate, self.cfg = evaluate, cfg
        self._identity = search_identity(space, data, cfg, *NOT_IDENTITY)

    @property
    def rounds(self) -> int:
        return self.cfg.iterations

    def identity(self) -> dict[str, Any]:
        return self._identity

    def propose(self, rng: SearchRNG, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        samples = [
            self.controller.sample(rng.torch) for _ in range(self.cfg.candidates_per_iteration)
        ]
        return [
            {"tokens": tokens, "settings": self.controller.to_settings(tokens).to_dict()}
            for tokens in samples
        ]

    def score(self, candidate: Mapping[str, Any], index: int) -> dict[str, Any]:
        return self.evaluate(S2DSettings.from_dict(candidate["settings"]), index)

    def update(self, records: Sequence[dict[str, Any]]) -> None:
        self.reinforce.update([r["tokens"] for r in records], [r["reward"] for r in records])

    def state_dict(self) -> dict[str, Any]:
        return {"reinforce": self.reinforce.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reinforce.load_state_dict(state["reinforce"])  # type: ignore[arg-type]

    def result(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The best settings by reward, and the `top_k` distinct ones the retrain phases train."""
        top = [
            {"index": c["index"], "settings": c["settings"], "reward": c["reward"]}
            for c in top_candidates(records, self.cfg.top_k)
        ]
        return {"architecture": top[0]["settings"], "reward": top[0]["reward"], "top_k": top}

    def for_task(self) -> ControllerSearch:
        """In an array task: on the task's one GPU (index 0), and without the controller's Trainer
        attached to the datamodule (it stays in the controller's process)."""
        if not isinstance(self.evaluate, CandidateEvaluator):
            return self
        task = copy.copy(self)
        task.evaluate = replace(
            self.evaluate,
            datamodule=for_array_task(self.evaluate.datamodule),
            trainer=replace(self.evaluate.trainer, device_index=0),
        )
        return task

    def gpus_per_task(self) -> int:
        trainer = getattr(self.evaluate, "trainer", None)
        return 1 if isinstance(trainer, CandidateTrainer) and trainer.accelerator == "gpu" else 0


def top_candidates(candidates: Sequence[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The `k` best distinct settings by reward (earlier candidates win ties)."""
    best: dict[str, dict[str, Any]] = {}
    for c in sorted(candidates, key=lambda c: (-c["reward"], c["index"])):
        best.setdefault(json.dumps(c["settings"]), c)
    return list(best.values())[:k]
