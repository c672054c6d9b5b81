"""How good a sampled S2D network is: accuracy under dynamic inference on val, against its MACs.

Dynamic inference follows S2DNAS (Yuan et al., ECCV 2020): a sample runs stage after stage and
leaves at the first exit whose confidence (max softmax probability) reaches a threshold. The default
rule uses one fixed threshold for every exit, the paper's own inference rule; it needs no
calibration, so each candidate's exit distribution (and so its average MACs) reflects how confident
its early stages really are. The alternative calibrates thresholds on val for MSDNet's budget level
q, which fixes the exit distribution and compares candidates at equal exit fractions. Only the
held-out val split is ever used here, never test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from dynlab.evaluation.budgeted import calibrate_thresholds, exit_distribution, exit_indices
from dynlab.techniques.s2dnas.config import ExitRule, RewardForm, S2DNASSearchConfig


@dataclass(frozen=True)
class DynamicScore:
    """A network under dynamic inference on val: top-1 (%), average MACs and how samples exit."""

    accuracy: float
    avg_macs: float
    macs_ratio: float  # avg_macs / the static model's MACs
    exit_fractions: list[float]
    thresholds: list[
        float | None
    ]  # None: nobody leaves there (inf) or everybody left leaves (-inf)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def dynamic_score(
    probs: Tensor,
    targets: Tensor,
    exit_macs: Sequence[float],
    static_macs: float,
    cfg: S2DNASSearchConfig,
) -> DynamicScore:
    """Accuracy and average MACs when each sample leaves at its exit under `cfg.exit_rule`."""
    num_exits = probs.shape[0]
    if cfg.exit_rule == ExitRule.threshold:
        thresholds = torch.tensor(
            [cfg.threshold] * (num_exits - 1) + [-math.inf], dtype=probs.dtype
        )
    else:
        thresholds = calibrate_thresholds(probs, exit_distribution(cfg.budget_q, num_exits))
    exits = exit_indices(probs, thresholds)
    correct = probs.argmax(dim=2).gather(0, exits[None])[0] == targets
    macs = torch.tensor(list(exit_macs), dtype=torch.float64)
    avg_macs = float(macs[exits].mean())
    fractions = torch.bincount(exits, minlength=num_exits).double() / len(exits)
    return DynamicScore(
        accuracy=100.0 * float(correct.double().mean()),
        avg_macs=avg_macs,
        macs_ratio=avg_macs / static_macs,
        exit_fractions=fractions.tolist(),
        thresholds=[t if math.isfinite(t) else None for t in thresholds.tolist()],
    )


def reward(score: DynamicScore, cfg: S2DNASSearchConfig) -> float:
    """The search objective: ACC - lambda * MACs/static, or MnasNet's ACC * (MACs/target)^w
    (Tan et al., CVPR 2019, Eq. 2, soft constraint); ACC as a fraction in [0, 1]."""
    accuracy = score.accuracy / 100.0
    if cfg.reward == RewardForm.difference:
        return accuracy - cfg.cost_weight * score.macs_ratio
    return accuracy * (score.macs_ratio / cfg.target_macs_ratio) ** cfg.product_exponent
