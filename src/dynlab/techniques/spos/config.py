"""Schema of `technique=spos` (Guo et al., "Single Path One-Shot Neural Architecture Search with
Uniform Sampling", ECCV 2020; official code megvii-model/SinglePathOneShot). The search space is
the backbone (`backbone=spos_supernet`, `cifar_spos_supernet`, ...); the technique trains it one
path at a time, searches it by evolution under a MACs window and retrains the winner."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

from dynlab.config import register_schema
from dynlab.techniques.supernet_config import EvolutionConfig, SupernetConfig


class PathSampler(StrEnum):
    # Every layer's choice drawn uniformly and independently (the paper, Sec. 3.2).
    uniform = "uniform"
    # A MACs bin drawn uniformly, then uniform paths until one falls in it (official
    # Supernet/train.py get_uniform_sample_cand: bins of 10 M between 290 M and 360 M, 500 tries,
    # else any uniform path).
    macs_bins = "macs_bins"


@dataclass
class SamplerConfig:
    """How the supernet phase draws its one path per step."""

    kind: PathSampler = PathSampler.uniform
    bins_low_mmacs: float = 290.0
    bins_high_mmacs: float = 360.0
    bin_width_mmacs: float = 10.0
    tries: int = 500

    def __post_init__(self) -> None:
        if self.bin_width_mmacs <= 0 or self.tries < 1:
            raise ValueError("spos sampler: bin_width_mmacs must be > 0 and tries >= 1")
        if self.bins_low_mmacs >= self.bins_high_mmacs:
            raise ValueError(
                f"spos sampler: bins_low_mmacs={self.bins_low_mmacs} must be below "
                f"bins_high_mmacs={self.bins_high_mmacs}"
            )


@dataclass
class SPOSConfig(SupernetConfig):
    DEPRECATED: ClassVar[dict[str, str]] = {
        "arch": "architecture",
        "arch_file": "architecture_file",
    }
    PHASES: ClassVar[tuple[str, ...]] = ("supernet", "evolution", "retrain", "rank")
    HELD_OUT_USES: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("train", "search"), "the evolution scores candidates on it"),
        "rank": "the ranking scores architectures on it",
    }

    _target_: str = "dynlab.techniques.spos.module.SPOSModule"
    name: str = "spos"
    # Channel search: each layer's mid width also searched over 0.2..2.0 of its base (the official
    # code never released it, official issue #1). Passed to the supernet backbone; null: the
    # backbone's own setting (off, except cifar_spos_supernet_small).
    channel_search: bool | None = None
    # Deprecated names of `architecture` (block ids, then scale ids with channel search) and
    # `architecture_file` (SupernetConfig).
    arch: list[int] | None = None
    arch_file: str | None = None
    # After the retrain phase, BN statistics recomputed as an exact average over one pass of the
    # (augmented) train split: the official Evaluation/template/train.py ends with one more epoch at
    # lr 0 with BN momentum 1/iters ("bn_process").
    retrain_bn_recalibration: bool = True
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    seed: int = "${seed}"  # type: ignore[assignment]


register_schema("technique", "spos", SPOSConfig)
