"""Schema of `technique=s2dnas`: the transformation, its training loss, and its search."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from dynlab.config import CandidatesOn, TechniqueConfig, register_schema


class RewardForm(StrEnum):
    difference = "difference"  # ACC - lambda * MACs / static MACs
    product = "product"  # MnasNet's ACC * (MACs / target)^w


class ExitRule(StrEnum):
    """How each exit's confidence threshold is set (always on val, never on test)."""

    threshold = "threshold"  # fixed: `threshold`, one value shared or one per exit 1..s-1
    budget = "budget"  # calibrated on val for MSDNet's budget level `budget_q`
    searched = "searched"  # per exit, the grid values maximising the reward on val


# 0.5, 0.55, ..., 0.95, 0.99: the confidences the `searched` rule chooses from for each exit.
DEFAULT_THRESHOLD_GRID: tuple[float, ...] = (*(round(0.5 + 0.05 * i, 2) for i in range(10)), 0.99)


class ExitFeatures(StrEnum):
    """What exit k's linear classifier reads (pooled over space)."""

    # stage k's own last feature map: the paper's per-stage classifiers (Yuan et al., Fig. 2)
    own = "own"
    # the last feature maps of stages 1..k concatenated (dynlab's earlier default)
    all = "all"


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
    # exit_rule=threshold: one confidence shared by exits 1..s-1, or a list with one per exit
    # (s-1 values, checked against technique.num_stages when the module is built). `Any`:
    # OmegaConf's unions take primitive types only, so float | list[float] cannot be declared.
    threshold: Any = 0.9
    budget_q: float = 1.0
    # exit_rule=searched: the values each exit's threshold is chosen from, and the coordinate-
    # ascent sweeps over exits 1..s-1 (it stops early once a sweep changes nothing)
    threshold_grid: list[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLD_GRID))
    threshold_sweeps: int = 3
    top_k: int = 2
    retrain_epochs: int | None = None  # None: the trainer's max_epochs
    select_by: SelectBy = SelectBy.reward
    # The paper's shape: a search transforms a trained static model, so the paper-scale presets
    # refuse to search without technique.init_from (the digits preset may start from scratch).
    require_static: bool = False
    candidates_on: CandidatesOn = CandidatesOn.auto

    def __post_init__(self) -> None:
        for name in (
            "iterations",
            "candidates_per_iteration",
            "candidate_epochs",
            "controller_hidden",
            "top_k",
            "threshold_sweeps",
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
        self.threshold = _confidences("threshold", self.threshold, shared=True)
        self.threshold_grid = sorted(set(_confidences("threshold_grid", self.threshold_grid)))
        if self.budget_q <= 0 or self.target_macs_ratio <= 0 or self.controller_lr <= 0:
            raise ValueError(
                "s2dnas search.budget_q, target_macs_ratio and controller_lr must be > 0"
            )

    def stage_thresholds(self, num_exits: int) -> list[float]:
        """The fixed thresholds of exits 1..num_exits-1 (`exit_rule=threshold`): the shared value
        repeated, or the list, which must hold one value per early exit."""
        if isinstance(self.threshold, float):
            return [self.threshold] * (num_exits - 1)
        if len(self.threshold) != num_exits - 1:
            raise ValueError(
                f"s2dnas search.threshold has {len(self.threshold)} values for {num_exits} stages: "
                f"give one per early exit 1..{num_exits - 1} ({num_exits - 1} values), or one "
                "float shared by all"
            )
        return list(self.threshold)


def _confidences(name: str, value: Any, shared: bool = False) -> Any:
    """`value` as a float (when `shared` allows one) or a non-empty list of floats, each in (0, 1]."""
    if shared and isinstance(value, int | float) and not isinstance(value, bool):
        values, result = [float(value)], float(value)
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0:
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise ValueError(f"s2dnas search.{name} must hold numbers, got {list(value)}")
        values = result = [float(v) for v in value]
    else:
        kind = "a float or a non-empty list of floats" if shared else "a non-empty list of floats"
        raise ValueError(f"s2dnas search.{name} must be {kind}, got {value!r}")
    if not all(0 < v <= 1 for v in values):
        raise ValueError(f"s2dnas search.{name} must be in (0, 1], got {value}")
    return result


@dataclass
class S2DNASConfig(TechniqueConfig):
    PHASES: ClassVar[tuple[str, ...]] = ("train", "search", "retrain_*", "select")
    HELD_OUT_USES: ClassVar[dict[str, str]] = {
        "search": "the search scores candidates on it and `select` picks the final network by it"
    }
    CALIBRATED_EXITS: ClassVar[bool] = True

    _target_: str = "dynlab.techniques.s2dnas.module.S2DNASModule"
    name: str = "s2dnas"
    num_stages: int = 3
    groups: int = 8  # G: channel groups per layer; split points pick group boundaries
    # Per layer group (feature-map size), num_stages-1 increasing points in 1..groups-1; one entry
    # is shared by all layer groups; null: equal split (groups // num_stages per stage).
    split_points: list[list[int]] | None = None
    # Per layer group, the indicator matrix m_ij (rows for stages i = 2..s, row i with one bit per
    # earlier stage j < i; one matrix is shared by every group); null: every stage reads every
    # earlier one. The earlier form, rows per stage of one bit per layer group meaning "read all
    # earlier stages", still loads (e.g. [[true], [false]]).
    concat: list[Any] | None = None
    loss_weights: list[float] | None = None  # w_k of sum_k w_k CE(exit_k); null: all 1 (MSDNet)
    exit_features: ExitFeatures = ExitFeatures.own
    init_from: str | None = None  # checkpoint of a trained static model (technique=baseline)
    seed: int = "${seed}"  # type: ignore[assignment]
    search: S2DNASSearchConfig = field(default_factory=S2DNASSearchConfig)


register_schema("technique", "s2dnas", S2DNASConfig)
