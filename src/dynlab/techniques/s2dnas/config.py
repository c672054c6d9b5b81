"""Schema of `technique=s2dnas`: the transformation, its training loss, and its search."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

from dynlab.config import TechniqueConfig, register_schema


class RewardForm(StrEnum):
    difference = "difference"  # ACC - lambda * MACs / static MACs
    product = "product"  # MnasNet's ACC * (MACs / target)^w


class ExitRule(StrEnum):
    threshold = "threshold"  # leave at the first exit whose confidence reaches `threshold`
    budget = "budget"  # thresholds calibrated on val for MSDNet's budget level `budget_q`


class SelectBy(StrEnum):
    reward = "reward"
    accuracy = "accuracy"


@dataclass
class S2DNASSearchConfig:
    """The controller, its REINFORCE updates, the candidates' short training and their reward."""

    iterations: int = 20  # controller updates
    candidates_per_iteration: int = (
        2  # sampled per update; spread over DDP ranks when there are any
    )
    candidate_epochs: int = 1
    candidate_batches: int | None = None  # training batches per candidate epoch (None: all)
    controller_hidden: int = 64
    controller_lr: float = 0.01
    baseline_decay: float = 0.9  # moving-average baseline b <- decay * b + (1 - decay) * reward
    entropy_weight: float = 1e-3
    reward: RewardForm = RewardForm.difference
    cost_weight: float = 0.3  # lambda of the difference form
    target_macs_ratio: float = 0.5  # product form: target = ratio * static MACs
    product_exponent: float = -0.07  # MnasNet's soft-constraint exponent (Tan et al. 2019, Sec. 3)
    exit_rule: ExitRule = ExitRule.threshold
    threshold: float = 0.9
    budget_q: float = 1.0
    top_k: int = 2
    retrain_epochs: int | None = None  # None: the trainer's max_epochs
    select_by: SelectBy = SelectBy.reward

    def __post_init__(self) -> None:
        for name in (
            "iterations",
            "candidates_per_iteration",
            "candidate_epochs",
            "controller_hidden",
            "top_k",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"s2dnas search.{name} must be >= 1, got {getattr(self, name)}")
        if self.candidate_batches is not None and self.candidate_batches < 1:
            raise ValueError(
                f"s2dnas search.candidate_batches must be >= 1 or null, got {self.candidate_batches}"
            )
        if self.retrain_epochs is not None and self.retrain_epochs < 1:
            raise ValueError(
                f"s2dnas search.retrain_epochs must be >= 1 or null, got {self.retrain_epochs}"
            )
        if not 0 <= self.baseline_decay < 1:
            raise ValueError(
                f"s2dnas search.baseline_decay must be in [0, 1), got {self.baseline_decay}"
            )
        if not 0 < self.threshold <= 1:
            raise ValueError(f"s2dnas search.threshold must be in (0, 1], got {self.threshold}")
        if self.budget_q <= 0 or self.target_macs_ratio <= 0 or self.controller_lr <= 0:
            raise ValueError(
                "s2dnas search.budget_q, target_macs_ratio and controller_lr must be > 0"
            )


@dataclass
class S2DNASConfig(TechniqueConfig):
    PHASES: ClassVar[tuple[str, ...]] = ("train", "search", "retrain_*", "select")

    _target_: str = "dynlab.techniques.s2dnas.module.S2DNASModule"
    name: str = "s2dnas"
    num_stages: int = 3
    groups: int = 8  # G: channel groups per layer; split points pick group boundaries
    # Per layer group (feature-map size), num_stages-1 increasing points in 1..groups-1; one entry
    # is shared by all layer groups; null: equal split (groups // num_stages per stage).
    split_points: list[list[int]] | None = None
    # Per stage 2..num_stages, one bit per layer group (or one bit for all); null: concat everywhere.
    concat: list[list[bool]] | None = None
    loss_weights: list[float] | None = None  # w_k of sum_k w_k CE(exit_k); null: all 1 (MSDNet)
    init_from: str | None = None  # checkpoint of a trained static model (technique=baseline)
    seed: int = "${seed}"  # type: ignore[assignment]
    search: S2DNASSearchConfig = field(default_factory=S2DNASSearchConfig)


register_schema("technique", "s2dnas", S2DNASConfig)
