"""Schema of `technique=sfr` (Yang et al., "CondenseNet V2: Sparse Feature Reactivation for Deep
Networks", CVPR 2021; official code jianghaojun/CondenseNetV2). The network's LGC and SFR layers,
their groups and condense/sparse factors come from the backbone (`backbone=condensenetv2_a`, ...);
the technique schedules their pruning and converts them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dynlab.config import TechniqueConfig, register_schema


@dataclass
class SFRConfig(TechniqueConfig):
    PHASES: ClassVar[tuple[str, ...]] = ("train",)

    _target_: str = "dynlab.techniques.sfr.module.SFRModule"
    name: str = "sfr"
    # The drops are spread evenly over this fraction of training, the rest trains with fixed masks
    # (official utils/layers.py LGC._check_drop: stage s begins at 2p >= s / (C - 1), i.e. 0.5).
    sparsify_fraction: float = 0.5
    # Weight of CondenseNet's group-lasso term (Huang et al. 2018, Sec. 3.1); 0: off, as in the
    # official V2 train.py, which defines LGC.lasso_loss but never adds it.
    group_lasso: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.sparsify_fraction <= 1:
            raise ValueError(
                f"sfr sparsify_fraction must be in (0, 1], got {self.sparsify_fraction}"
            )
        if self.group_lasso < 0:
            raise ValueError(f"sfr group_lasso must be >= 0, got {self.group_lasso}")


register_schema("technique", "sfr", SFRConfig)
