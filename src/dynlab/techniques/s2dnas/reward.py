"""How good a sampled S2D network is: accuracy under dynamic inference on val, against its MACs.

Dynamic inference follows S2DNAS (Yuan et al., ECCV 2020): a sample runs stage after stage and
leaves at the first exit whose confidence (max softmax probability) reaches that exit's threshold;
the last exit takes everything left. The paper presets one threshold per stage. Three rules set
them, always on the held-out val split, never on test (`exit_rule`):

* `threshold`: fixed values, one shared by every exit or one per exit. Needs no calibration, so a
  candidate's exit distribution (and so its average MACs) reflects how confident its early stages
  really are.
* `budget`: calibrated on val for MSDNet's budget level q, which fixes the exit distribution and
  compares candidates at equal exit fractions.
* `searched`: for each candidate, per-exit values from a fixed grid that maximise the reward on
  val (coordinate ascent from the best shared value, post hoc on the val softmax outputs, no
  retraining).

The reward's MACs term is the average over val of the cumulative MACs of the exit each sample
takes, so it follows the thresholds. The same thresholds are what the trained network reports at
test time (`inference_record`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from dynlab.evaluation.budgeted import calibrate_thresholds, exit_distribution, exit_indices
from dynlab.techniques.s2dnas.config import ExitRule, RewardForm, S2DNASSearchConfig


@dataclass(frozen=True)
class DynamicScore:
    """A network under dynamic inference on a split: top-1 (%), average MACs and how samples exit."""

    accuracy: float
    avg_macs: float
    macs_ratio: float  # avg_macs / the static model's MACs
    exit_fractions: list[float]
    thresholds: list[
        float | None
    ]  # None: nobody leaves there (inf) or everybody left leaves (-inf, the last exit)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def dynamic_score(
    probs: Tensor,
    targets: Tensor,
    exit_macs: Sequence[float],
    static_macs: float,
    cfg: S2DNASSearchConfig,
) -> DynamicScore:
    """Accuracy and average MACs when each sample leaves at its exit under `cfg.exit_rule`.

    `probs` [K,N,C] are softmax outputs on val, `exit_macs` the cumulative MACs to reach each exit.
    """
    thresholds = exit_thresholds(probs, targets, exit_macs, static_macs, cfg)
    return score_at(probs, targets, thresholds, exit_macs, static_macs)


def exit_thresholds(
    probs: Tensor,
    targets: Tensor,
    exit_macs: Sequence[float],
    static_macs: float,
    cfg: S2DNASSearchConfig,
) -> Tensor:
    """The threshold of every exit [K] under `cfg.exit_rule` (last: -inf), set on these val outputs."""
    num_exits = probs.shape[0]
    if cfg.exit_rule == ExitRule.threshold:
        return _with_last(cfg.stage_thresholds(num_exits))
    if cfg.exit_rule == ExitRule.budget:
        return calibrate_thresholds(probs, exit_distribution(cfg.budget_q, num_exits))
    return search_thresholds(probs, targets, exit_macs, static_macs, cfg)


def search_thresholds(
    probs: Tensor,
    targets: Tensor,
    exit_macs: Sequence[float],
    static_macs: float,
    cfg: S2DNASSearchConfig,
) -> Tensor:
    """Per-exit thresholds from `cfg.threshold_grid` that maximise `reward` on these val outputs.

    Deterministic coordinate ascent: start from the best threshold shared by every exit, then, for
    up to `threshold_sweeps` sweeps over exits 1..K-1, set each to its best grid value with the
    others held (ties keep the current value, or the lower one at the start). The result's reward is
    never below the best shared grid value's.
    """
    num_exits, grid = probs.shape[0], list(cfg.threshold_grid)
    if num_exits == 1:
        return _with_last([])
    outputs = _Outputs.of(probs, targets)  # the max over classes once, not per evaluation

    def value(thresholds: list[float]) -> float:
        return reward(outputs.score(_with_last(thresholds), exit_macs, static_macs), cfg)

    best, best_reward = None, -math.inf
    for t in grid:
        r = value([t] * (num_exits - 1))
        if r > best_reward:
            best, best_reward = [t] * (num_exits - 1), r
    assert best is not None
    for _ in range(cfg.threshold_sweeps):
        changed = False
        for k in range(num_exits - 1):
            for t in grid:
                if t == best[k]:
                    continue
                trial = [*best[:k], t, *best[k + 1 :]]
                r = value(trial)
                if r > best_reward:
                    best, best_reward, changed = trial, r, True
        if not changed:
            break
    return _with_last(best)


def score_at(
    probs: Tensor,
    targets: Tensor,
    thresholds: Tensor,
    exit_macs: Sequence[float],
    static_macs: float,
) -> DynamicScore:
    """Accuracy and average MACs of probs [K,N,C] when samples leave at `thresholds` [K].

    The MACs are those of the exit each sample takes (cumulative MACs to reach it), averaged.
    """
    return _Outputs.of(probs, targets).score(thresholds, exit_macs, static_macs)


def reward(score: DynamicScore, cfg: S2DNASSearchConfig) -> float:
    """The search objective on val: ACC - lambda * avg MACs / static MACs (`difference`, lambda =
    `cost_weight`), or MnasNet's ACC * (avg MACs / target)^w (Tan et al., CVPR 2019, Eq. 2, soft
    constraint; `product`); ACC as a fraction in [0, 1]. The MACs are relative to the static model,
    so lambda does not depend on the backbone's size."""
    accuracy = score.accuracy / 100.0
    if cfg.reward == RewardForm.difference:
        return accuracy - cfg.cost_weight * score.macs_ratio
    return accuracy * (score.macs_ratio / cfg.target_macs_ratio) ** cfg.product_exponent


def inference_record(
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    exit_macs: Sequence[float],
    static_macs: float,
    cfg: S2DNASSearchConfig,
) -> dict[str, Any]:
    """Early exit on test at the thresholds `cfg.exit_rule` sets on val (never on test).

    `val` and `test` are (softmax outputs [K,N,C], targets [N]). Returns the rule, the thresholds
    of exits 1..K-1 (inf: nobody leaves there), test top-1 (%), average MACs, MACs ratio and exit
    fractions, and the val score and reward at the same thresholds.
    """
    thresholds = exit_thresholds(*val, exit_macs, static_macs, cfg)
    on_val = score_at(*val, thresholds, exit_macs, static_macs)
    on_test = score_at(*test, thresholds, exit_macs, static_macs)
    return {
        "rule": str(cfg.exit_rule),
        "thresholds": thresholds[:-1].tolist(),
        "top1": on_test.accuracy,
        "avg_macs": on_test.avg_macs,
        "macs_ratio": on_test.macs_ratio,
        "exit_fractions": on_test.exit_fractions,
        "val": {
            "top1": on_val.accuracy,
            "avg_macs": on_val.avg_macs,
            "exit_fractions": on_val.exit_fractions,
            "reward": reward(on_val, cfg),
        },
    }


@dataclass(frozen=True)
class _Outputs:
    """Exit outputs reduced to what early exit needs: confidences [K,N,1] (the max softmax
    probability, shaped as one-class probs for `exit_indices`) and correctness [K,N]."""

    confidence: Tensor
    correct: Tensor

    @classmethod
    def of(cls, probs: Tensor, targets: Tensor) -> _Outputs:
        if probs.ndim != 3 or probs.shape[1] != len(targets):
            raise ValueError(f"probs {tuple(probs.shape)} and targets {len(targets)} do not match")
        confidence, prediction = probs.max(dim=2, keepdim=True)
        return cls(confidence, prediction[..., 0] == targets.to(prediction.device)[None])

    def score(
        self, thresholds: Tensor, exit_macs: Sequence[float], static_macs: float
    ) -> DynamicScore:
        num_exits = self.correct.shape[0]
        if len(exit_macs) != num_exits:
            raise ValueError(f"{len(exit_macs)} exit MACs for {num_exits} exits")
        exits = exit_indices(self.confidence, thresholds)
        correct = self.correct.gather(0, exits[None])[0]
        macs = torch.tensor([float(m) for m in exit_macs], dtype=torch.float64)
        avg_macs = float(macs[exits.cpu()].mean())  # the MACs of the exit each sample takes
        fractions = torch.bincount(exits, minlength=num_exits).cpu().double() / len(exits)
        return DynamicScore(
            accuracy=100.0 * float(correct.double().mean()),
            avg_macs=avg_macs,
            macs_ratio=avg_macs / static_macs,
            exit_fractions=fractions.tolist(),
            thresholds=[t if math.isfinite(t) else None for t in thresholds.tolist()],
        )


def _with_last(thresholds: Sequence[float]) -> Tensor:
    """Thresholds of exits 1..K-1 plus the last exit's -inf (it takes everything left); float64,
    so a configured 0.9 is recorded as 0.9 (`exit_indices` compares in the outputs' dtype)."""
    return torch.tensor([*thresholds, -math.inf], dtype=torch.float64)
