"""Schema of `technique=anglenas` (Hu et al., ECCV 2020; official code megvii-model/AngleNAS,
SPOS/shrinking/config.py for the defaults). The space is an SPOS supernet backbone; the schedule
shrinks it by angle while a supernet trains, then runs SPOS on what is left."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from dynlab.config import register_schema
from dynlab.techniques.spos.config import PathSampler, SPOSConfig


@dataclass
class ShrinkingConfig:
    """Angle-based shrinking (official SPOS/shrinking/main.py and shrinking.py): after
    `first_epochs` epochs, then every `step_epochs`, the `drop_per_step` operators whose paths'
    weights moved the smallest angle from the reference are dropped, until the space holds at
    most `stop_size` architectures (counted over the shrunk genes, the operator choices)."""

    first_epochs: int = 100  # official config.py: first_stage_epochs
    step_epochs: int = 5  # official: other_stage_epochs
    # Operators dropped per step; null: the choices of a layer + 1 (official op_num + 1 = 7).
    drop_per_step: int | None = None
    stop_size: float = 1.0e6  # official: the space holds <= 1e6 architectures
    # Paths whose angles average into an operator's score (official sample_num).
    paths_per_operator: int = 1000
    # The scoring paths' MACs cap in millions; null: none (official: 600 M FLOPs at 224).
    score_max_mmacs: float | None = None
    # The reference weights become the current ones once more than this many operators were
    # dropped (official SPOS/shrinking/main.py l.137: `(i+1) * per_stage_drop_num >
    # modify_initial_model_threshold`, 50 in SPOS/shrinking/config.py); null: never.
    reference_swap_drops: int | None = 50

    def __post_init__(self) -> None:
        for name in ("first_epochs", "step_epochs", "paths_per_operator"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"technique.shrinking.{name} must be >= 1, got {getattr(self, name)}"
                )
        if self.drop_per_step is not None and self.drop_per_step < 1:
            raise ValueError(
                f"technique.shrinking.drop_per_step must be >= 1 or null, got {self.drop_per_step}"
            )
        if not (math.isfinite(self.stop_size) and self.stop_size >= 1):
            raise ValueError(
                f"technique.shrinking.stop_size must be a space size >= 1, got {self.stop_size}"
            )
        if self.score_max_mmacs is not None and not self.score_max_mmacs > 0:
            raise ValueError(
                f"technique.shrinking.score_max_mmacs must be > 0 or null, got "
                f"{self.score_max_mmacs}"
            )
        if self.reference_swap_drops is not None and self.reference_swap_drops < 0:
            raise ValueError(
                "technique.shrinking.reference_swap_drops must be >= 0 or null, got "
                f"{self.reference_swap_drops}"
            )


@dataclass
class AngleNASConfig(SPOSConfig):
    PHASES: ClassVar[tuple[str, ...]] = ("shrink", "supernet", "evolution", "retrain", "rank")

    _target_: str = "dynlab.techniques.anglenas.module.AngleNASModule"
    name: str = "anglenas"
    shrinking: ShrinkingConfig = field(default_factory=ShrinkingConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampler.kind != PathSampler.uniform:
            raise ValueError(
                "anglenas: technique.sampler.kind must be uniform (the official shrinking and "
                f"search supernets sample each layer uniformly over its operators left), got "
                f"{self.sampler.kind}"
            )


register_schema("technique", "anglenas", AngleNASConfig)
