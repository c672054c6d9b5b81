"""Schema of `technique=spos` (Guo et al., "Single Path One-Shot Neural Architecture Search with
Uniform Sampling", ECCV 2020; official code megvii-model/SinglePathOneShot). The search space is
the backbone (`backbone=spos_supernet`, `cifar_spos_supernet`, ...); the technique trains it one
path at a time, searches it by evolution under a MACs window and retrains the winner."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

from dynlab.config import CandidatesOn, register_schema
from dynlab.techniques.supernet_config import SupernetConfig


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
class EvolutionConfig:
    """The evolutionary search (official Search/search.py defaults) and how a candidate is scored
    (official Search/tester.py: BN recalibrated on 200 training batches, then 8,000 val images)."""

    population: int = 50
    generations: int = 20
    parents: int = 10  # select_num: the best candidates seen so far breed the next generation
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.1  # m_prob: each gene resampled with this probability
    # Candidates outside [min, max] MACs (millions, per image at the dataset's input size) are
    # never evaluated; null: no bound. Official: at most 330 M at 224; a minimum was asked for in
    # the official issue #10. Random candidates are drawn uniformly among those inside the window
    # (`sampling.WindowSampler`), mutants and children outside it are refused (official is_legal).
    min_mmacs: float | None = None
    max_mmacs: float | None = None
    # Tries per wanted candidate before a generation gives up filling a slot (official: x10).
    tries_factor: int = 10
    recalibration_batches: int = 200
    recalibration_batch_size: int = 128
    # Val images a candidate is scored on: the first N of the fixed held-out val split (never
    # test); null: all of it.
    val_images: int | None = 8000
    # A time window (ms per image at batch 1, eager PyTorch on this machine's CPU with
    # `latency_threads` threads), on the latency table's prediction (`techniques/spos/latency.py`:
    # each choice block timed in isolation, the candidate's ops summed; built once per device and
    # cached); null: no bound. Candidates outside it are never scored, as outside the MACs window.
    min_latency_ms: float | None = None
    max_latency_ms: float | None = None
    latency_threads: int = 1
    # Where candidates are scored: this job's ranks, or one Slurm job array a generation (auto: an
    # array when launched with hydra/launcher=slurm on one rank).
    candidates_on: CandidatesOn = CandidatesOn.auto

    def __post_init__(self) -> None:
        for name in ("population", "generations", "parents", "tries_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"spos evolution.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mutations", "crossovers"):
            if getattr(self, name) < 0:
                raise ValueError(f"spos evolution.{name} must be >= 0, got {getattr(self, name)}")
        if self.mutations + self.crossovers > self.population:
            raise ValueError(
                f"spos evolution: mutations + crossovers = {self.mutations + self.crossovers} "
                f"exceed the population {self.population}"
            )
        if not 0 <= self.mutation_prob <= 1:
            raise ValueError(
                f"spos evolution.mutation_prob must be in [0, 1], got {self.mutation_prob}"
            )
        if self.recalibration_batches < 1 or self.recalibration_batch_size < 1:
            raise ValueError("spos evolution.recalibration_batches and _batch_size must be >= 1")
        if self.val_images is not None and self.val_images < 1:
            raise ValueError(
                f"spos evolution.val_images must be >= 1 or null, got {self.val_images}"
            )
        for name in ("min_latency_ms", "max_latency_ms"):
            bound = getattr(self, name)
            if bound is not None and not (math.isfinite(bound) and bound > 0):
                raise ValueError(f"spos evolution.{name} must be > 0 or null, got {bound}")
        if (
            self.min_latency_ms is not None
            and self.max_latency_ms is not None
            and self.min_latency_ms >= self.max_latency_ms
        ):
            raise ValueError(
                f"spos evolution: the time window is empty: min_latency_ms={self.min_latency_ms} "
                f"must be below max_latency_ms={self.max_latency_ms}"
            )
        if self.latency_threads < 1:
            raise ValueError(
                f"spos evolution.latency_threads must be >= 1, got {self.latency_threads}"
            )
        lo, hi = self.min_mmacs, self.max_mmacs
        for name, bound in (("min_mmacs", lo), ("max_mmacs", hi)):
            if bound is not None and not (math.isfinite(bound) and bound > 0):
                raise ValueError(f"spos evolution.{name} must be > 0 or null, got {bound}")
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(
                f"spos evolution: the MACs window is empty: min_mmacs={lo} must be below "
                f"max_mmacs={hi}"
            )


@dataclass
class SPOSConfig(SupernetConfig):
    DEPRECATED: ClassVar[dict[str, str]] = {
        "arch": "architecture",
        "arch_file": "architecture_file",
    }
    PHASES: ClassVar[tuple[str, ...]] = ("supernet", "evolution", "retrain")
    HELD_OUT_USES: ClassVar[dict[str, str]] = dict.fromkeys(
        ("train", "search"), "the evolution scores candidates on it"
    )

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
