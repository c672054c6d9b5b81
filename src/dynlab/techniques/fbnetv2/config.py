"""Schema of `technique=fbnetv2` (Wan et al., "FBNetV2: Differentiable Neural Architecture Search
for Spatial and Channel Dimensions", CVPR 2020). The official repository
(facebookresearch/mobile-vision) holds only the searched models, so the search follows the paper;
where FBNetV2 is silent, FBNet (Wu et al., CVPR 2019) fills in, as marked. The search space is the
backbone (`backbone=fbnetv2_f_supernet`, `cifar_fbnetv2_supernet`, ...)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from dynlab.config import register_schema
from dynlab.techniques.supernet_config import SupernetConfig


class CostKind(StrEnum):
    macs = "macs"  # FBNetV2-F: per-FLOP accuracy
    params = "params"  # FBNetV2-P: per-parameter accuracy
    # FBNet's own cost: milliseconds per image at batch 1 on this machine, from the space's
    # latency table (techniques/fbnetv2/latency.py), built before the search and cached
    latency = "latency"


# How each cost is logged and reported: its name and the divisor to that unit.
COST_UNITS: dict[CostKind, tuple[str, float]] = {
    CostKind.macs: ("mmacs", 1e6),
    CostKind.params: ("mparams", 1e6),
    CostKind.latency: ("ms", 1.0),
}


@dataclass
class FBNetV2Config(SupernetConfig):
    DEPRECATED: ClassVar[dict[str, str]] = {
        "choices": "architecture",
        "choices_file": "architecture_file",
    }
    PHASES: ClassVar[tuple[str, ...]] = ("search", "retrain")

    _target_: str = "dynlab.techniques.fbnetv2.module.FBNetV2Module"
    name: str = "fbnetv2"
    cost: CostKind = CostKind.macs
    # loss = CE * alpha * (cost / reference)^beta, reference the space's cheapest architecture's
    # cost: FBNet's multiplicative loss (Sec. 3.3, CE * alpha * log(latency in ms)^beta; FBNetV2
    # Sec. 3.3 only says the loss combines cross-entropy and the total cost) in a form defined in
    # every space and unit, whose push on the cost (d log L / d log cost = beta) does not depend on
    # them (see `search_loss`). FBNet's values as its reimplementations (JunrQ/NAS, microsoft/nni)
    # use them (alpha 0.2, beta 0.6): the papers' own tables were not available to us.
    alpha: float = 0.2
    beta: float = 0.6
    # A target for the searched network's MACs (millions per image at the dataset's input size;
    # needs cost=macs). Set, the architecture loss is CE + target_weight * E_a |MACs(a) / target -
    # 1| over architectures a of the search's distribution (the logits' softmax) instead of the
    # loss above (alpha and beta unused): TuNAS's absolute reward (Bender et al., CVPR 2020),
    # quality + beta * |T(a) / T0 - 1| with beta < 0, as a loss, its expectation estimated as
    # TuNAS does, by REINFORCE over `target_samples` architectures drawn each step (their MACs
    # need no forward pass). Each draw's term is least, with zero gradient, at the target and
    # pulls from both sides with the same force whatever the distance, where FBNet's loss only
    # ever pushes the cost down. The argmax network retrained can still differ from the target:
    # the search reports its MACs and the softmax's expected MACs (results.json search.mmacs,
    # search.expected_mmacs). null: FBNet's loss.
    target_mmacs: float | None = None
    # The same target in milliseconds per image on this machine (needs cost=latency): TuNAS's
    # own use, a latency target.
    target_ms: float | None = None
    target_weight: float = 1.0
    target_samples: int = 32
    # Gumbel-softmax temperature: `temperature` at the first epoch, times `temperature_decay` each
    # epoch (FBNet: 5.0 and exp(-0.045) = 0.956, as above).
    temperature: float = 5.0
    temperature_decay: float = math.exp(-0.045)
    # Epochs at the start of the search that train the weights only (FBNet: 10 of 90).
    warmup_epochs: int = 10
    # Before every validation and at the end of the search, the BN statistics of the argmax
    # network are recomputed over this many batches of the `weights` stream: the supernet's running
    # statistics mix every resolution and width the Gumbel samples passed through. The paper does
    # not say how it evaluates during the search; this is dynlab's choice.
    recalibration_batches: int = 20
    # Threads the latency table is timed with (cost=latency): the deployment's thread count.
    latency_threads: int = 1
    # Deprecated names of `architecture` (the choices dict a search writes) and
    # `architecture_file` (SupernetConfig).
    choices: dict[str, Any] | None = None
    choices_file: str | None = None
    seed: int = "${seed}"  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha <= 0 or self.beta <= 0:
            raise ValueError(
                f"fbnetv2: the cost weights alpha={self.alpha} and beta={self.beta} must be > 0 "
                "(loss = CE * alpha * (cost / reference)^beta; beta sets how hard the cost pushes)"
            )
        for name, kind, unit in (
            ("target_mmacs", CostKind.macs, "M MACs"),
            ("target_ms", CostKind.latency, "ms"),
        ):
            value = getattr(self, name)
            if value is None:
                continue
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"fbnetv2: {name}={value} must be a number of {unit} > 0 (or null: FBNet's "
                    "loss)"
                )
            if CostKind(self.cost) != kind:
                raise ValueError(
                    f"fbnetv2: {name} needs cost={kind.value}, got cost={self.cost} (the target "
                    f"is in {unit})"
                )
        if self.latency_threads < 1:
            raise ValueError(f"fbnetv2 latency_threads must be >= 1, got {self.latency_threads}")
        if not (math.isfinite(self.target_weight) and self.target_weight > 0):
            raise ValueError(f"fbnetv2: target_weight={self.target_weight} must be > 0")
        if self.target_samples < 2:
            raise ValueError(
                f"fbnetv2: target_samples={self.target_samples} must be >= 2 (the REINFORCE "
                "baseline of each draw is the mean of the others)"
            )
        if self.temperature <= 0 or not 0 < self.temperature_decay <= 1:
            raise ValueError(
                f"fbnetv2: temperature={self.temperature} must be > 0 and temperature_decay="
                f"{self.temperature_decay} in (0, 1]"
            )
        if self.recalibration_batches < 1:
            raise ValueError(
                f"fbnetv2 recalibration_batches must be >= 1, got {self.recalibration_batches}"
            )
        if self.warmup_epochs < 0:
            raise ValueError(f"fbnetv2 warmup_epochs must be >= 0, got {self.warmup_epochs}")


register_schema("technique", "fbnetv2", FBNetV2Config)
