"""What the weight-sharing searches' schemas share (SPOS, FBNetV2, MetaPruning): one name for a
given architecture, `technique.architecture` (search_result.json's `architecture`) or
`technique.architecture_file` (a search_result.json), the techniques' older names kept as
deprecated aliases (`DEPRECATED`); and the evolutionary search's settings (`EvolutionConfig`). No
torch here, as in every schema."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dynlab.config import CandidatesOn, TechniqueConfig


@dataclass
class RankingConfig:
    """How well the supernet ranks architectures (`dynlab-rank`, `search/ranking.py`): `architectures`
    sampled from the space searched (seeded), each scored with inherited weights (as the
    evolution scores a candidate) and trained alone `seeds` times for `epochs` epochs with the
    technique's optimiser, both on the same held-out images."""

    architectures: int = 20
    seeds: int = 2
    epochs: int = 5
    batches_per_epoch: int | None = None  # null: whole epochs
    top_k: int = 5
    bootstrap: int = 2000
    # A ranking's search_result.json (another run's): rank its architectures instead of a fresh
    # sample, those outside this run's space left out (AngleNAS's shrunk space, the same
    # architectures under another supernet).
    architectures_file: str | None = None
    # A folder where trained-alone scores are kept by (space, data, recipe, architecture, seed)
    # and reused, e.g. by a second ranking of the same architectures; null: none.
    alone_cache: str | None = None
    candidates_on: CandidatesOn = CandidatesOn.auto

    def __post_init__(self) -> None:
        for name in ("seeds", "epochs", "top_k", "bootstrap"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"technique.ranking.{name} must be >= 1, got {getattr(self, name)}"
                )
        if self.architectures < 3:
            raise ValueError(
                "technique.ranking.architectures must be >= 3 (a rank correlation needs three), "
                f"got {self.architectures}"
            )
        if self.batches_per_epoch is not None and self.batches_per_epoch < 1:
            raise ValueError(
                "technique.ranking.batches_per_epoch must be >= 1 or null, got "
                f"{self.batches_per_epoch}"
            )


@dataclass
class SupernetConfig(TechniqueConfig):
    """A supernet technique's schema: with an architecture given, its schedule is `retrain`
    alone."""

    # A given architecture in the form the technique's search writes (SPOS: its genes; FBNetV2:
    # its choices dict); `Any`: OmegaConf's unions take primitive types only.
    architecture: Any = None
    # A search's search_result.json to take the architecture from.
    architecture_file: str | None = None
    ranking: RankingConfig = field(default_factory=RankingConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.architecture is not None and self.architecture_file is not None:
            raise ValueError(
                f"{self.name}: give technique.architecture or technique.architecture_file, not both"
            )


@dataclass
class EvolutionConfig:
    """The evolutionary search (`dynlab.search.evolution`; official SPOS Search/search.py
    defaults) and how a candidate is scored (official SPOS Search/tester.py: BN recalibrated on
    200 training batches, then 8,000 val images)."""

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
    # `latency_threads` threads), on the latency table's prediction (the technique's
    # latency table: each op timed in isolation, the candidate's ops summed and calibrated; built
    # once per device and cached); null: no bound. Candidates outside it are never scored, as outside the MACs window.
    min_latency_ms: float | None = None
    max_latency_ms: float | None = None
    latency_threads: int = 1
    # Where candidates are scored: this job's ranks, or one Slurm job array a generation (auto: an
    # array when launched with hydra/launcher=slurm on one rank).
    candidates_on: CandidatesOn = CandidatesOn.auto

    def __post_init__(self) -> None:
        for name in ("population", "generations", "parents", "tries_factor"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"technique.evolution.{name} must be >= 1, got {getattr(self, name)}"
                )
        for name in ("mutations", "crossovers"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"technique.evolution.{name} must be >= 0, got {getattr(self, name)}"
                )
        if self.mutations + self.crossovers > self.population:
            raise ValueError(
                f"technique.evolution: mutations + crossovers = {self.mutations + self.crossovers} "
                f"exceed the population {self.population}"
            )
        if not 0 <= self.mutation_prob <= 1:
            raise ValueError(
                f"technique.evolution.mutation_prob must be in [0, 1], got {self.mutation_prob}"
            )
        if self.recalibration_batches < 1 or self.recalibration_batch_size < 1:
            raise ValueError(
                "technique.evolution.recalibration_batches and _batch_size must be >= 1"
            )
        if self.val_images is not None and self.val_images < 1:
            raise ValueError(
                f"technique.evolution.val_images must be >= 1 or null, got {self.val_images}"
            )
        for name in ("min_latency_ms", "max_latency_ms"):
            bound = getattr(self, name)
            if bound is not None and not (math.isfinite(bound) and bound > 0):
                raise ValueError(f"technique.evolution.{name} must be > 0 or null, got {bound}")
        if (
            self.min_latency_ms is not None
            and self.max_latency_ms is not None
            and self.min_latency_ms >= self.max_latency_ms
        ):
            raise ValueError(
                f"technique.evolution: the time window is empty: min_latency_ms={self.min_latency_ms} "
                f"must be below max_latency_ms={self.max_latency_ms}"
            )
        if self.latency_threads < 1:
            raise ValueError(
                f"technique.evolution.latency_threads must be >= 1, got {self.latency_threads}"
            )
        lo, hi = self.min_mmacs, self.max_mmacs
        for name, bound in (("min_mmacs", lo), ("max_mmacs", hi)):
            if bound is not None and not (math.isfinite(bound) and bound > 0):
                raise ValueError(f"technique.evolution.{name} must be > 0 or null, got {bound}")
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(
                f"technique.evolution: the MACs window is empty: min_mmacs={lo} must be below "
                f"max_mmacs={hi}"
            )
