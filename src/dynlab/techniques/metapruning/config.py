"""Schema of `technique=metapruning` (Liu et al., "MetaPruning: Meta Learning for Automatic Neural
Network Channel Pruning", ICCV 2019; official code liuzechun/MetaPruning). The channel space is the
backbone (`backbone=cifar_pruningnet_resnet20`, `pruningnet_mobilenetv2`, ...); the technique trains
its PruningNet on a random configuration per step, searches configurations by evolution under a
MACs window and retrains the winner from scratch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dynlab.config import register_schema
from dynlab.techniques.supernet_config import EvolutionConfig, SupernetConfig


@dataclass
class MetaPruningConfig(SupernetConfig):
    PHASES: ClassVar[tuple[str, ...]] = ("pruningnet", "evolution", "retrain", "rank")
    HELD_OUT_USES: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("train", "search"), "the evolution scores configurations on it"),
        "rank": "the ranking scores configurations on it",
    }

    _target_: str = "dynlab.techniques.metapruning.module.MetaPruningModule"
    name: str = "metapruning"
    # The scale grid (fractions of each base width, rising within (0, 1]); null: the official
    # 0.10, 0.13, ..., 1.00. Passed to the PruningNet backbone; a grid that leaves some pruned
    # width at zero channels is refused before anything is built.
    scales: list[float] | None = None
    # The evolution (the official searching/search.py: population 50, 20 generations, top 10
    # breed 25 mutants and 25 crossover children, each gene resampled with probability 0.1) and
    # its MACs window (official: at most 330 M for MobileNetV2, [1950, 2050] M for ResNet-50).
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    # The uniform-width baseline the paper sets MetaPruning against (official README's "uniform
    # baseline" rows, Sec. 4.1): every layer at the widest one scale whose network costs at most
    # this many M MACs, retrained alone with no search; null: MetaPruning itself.
    uniform_mmacs: float | None = None
    # The evolution's random candidates: every scale id uniform over this many ids centred on the
    # uniform configuration of technique.evolution.max_mmacs (`uniform`), so a window far from
    # the grid's middle is reached (official resnet/searching/search.py l.234 draws ids 12-23, a
    # band of 12, for its 1 G and 2 G searches); null: the whole grid (official MobileNetV2
    # search). Mutants and crossover children are bred as officially, refused outside the window.
    random_band: int | None = None
    seed: int = "${seed}"  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.evolution.min_latency_ms is not None or self.evolution.max_latency_ms is not None:
            # A layer's time depends on two searched widths (31 x 31 entries a conv), too many
            # to time one by one as SPOS's and FBNetV2's tables do.
            raise ValueError(
                "metapruning: technique.evolution.min_latency_ms/max_latency_ms are not "
                "supported (no latency table for PruningNet spaces); bound the search by "
                "min_mmacs/max_mmacs"
            )
        if self.random_band is not None:
            if self.random_band < 1:
                raise ValueError(
                    f"technique.random_band must be >= 1 or null, got {self.random_band}"
                )
            if self.evolution.max_mmacs is None:
                raise ValueError(
                    "metapruning: technique.random_band is centred on the uniform configuration "
                    "of technique.evolution.max_mmacs; set that limit"
                )
        if self.uniform_mmacs is None:
            return
        if not self.uniform_mmacs > 0:
            raise ValueError(
                f"technique.uniform_mmacs must be > 0 or null, got {self.uniform_mmacs}"
            )
        if self.architecture is not None or self.architecture_file is not None:
            raise ValueError(
                "metapruning: technique.uniform_mmacs picks the architecture itself; give it or "
                "technique.architecture(_file), not both"
            )


register_schema("technique", "metapruning", MetaPruningConfig)
