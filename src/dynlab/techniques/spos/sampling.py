"""The supernet phase's path sampler: uniform, or the official MACs-binned rejection sampler."""

from __future__ import annotations

import numpy as np

from dynlab.backbones.spos_shufflenetv2 import MacsTable, SearchSpace
from dynlab.techniques.spos.config import PathSampler as SamplerKind
from dynlab.techniques.spos.config import SamplerConfig


class PathSampler:
    """Draws one candidate (genes: blocks, then scale ids with channel search) per step."""

    def __init__(self, space: SearchSpace, table: MacsTable, cfg: SamplerConfig) -> None:
        self.space, self.table, self.cfg = space, table, cfg
        self.bins: list[tuple[float, float]] = []
        if cfg.kind == SamplerKind.macs_bins:
            lo, hi = table.minimum() / 1e6, table.maximum() / 1e6
            edges = np.arange(cfg.bins_low_mmacs, cfg.bins_high_mmacs, cfg.bin_width_mmacs)
            self.bins = [(a, min(a + cfg.bin_width_mmacs, cfg.bins_high_mmacs)) for a in edges]
            # Only bins the space can reach: an empty bin would always fall back to uniform.
            self.bins = [(a, b) for a, b in self.bins if b >= lo and a <= hi]
            if not self.bins:
                raise ValueError(
                    f"spos sampler: the MACs bins [{cfg.bins_low_mmacs:g}, "
                    f"{cfg.bins_high_mmacs:g}] M miss the space, whose architectures span "
                    f"[{lo:.2f}, {hi:.2f}] M at this input size; set technique.sampler."
                    "bins_low_mmacs/bins_high_mmacs inside it, or technique.sampler.kind=uniform"
                )

    def uniform(self, rng: np.random.Generator) -> tuple[int, ...]:
        """Every gene drawn uniformly and independently (the paper's uniform path sampling)."""
        return tuple(int(rng.integers(n)) for n in self.space.gene_choices())

    def sample(self, rng: np.random.Generator) -> tuple[int, ...]:
        """A path: uniform, or (macs_bins) a bin drawn uniformly, then uniform paths until one
        lies in it, at most `tries` (official Supernet/train.py get_uniform_sample_cand, whose
        timeout then returns an unconstrained path, as here)."""
        if not self.bins:
            return self.uniform(rng)
        low, high = self.bins[int(rng.integers(len(self.bins)))]
        for _ in range(self.cfg.tries):
            genes = self.uniform(rng)
            if low * 1e6 <= self.table.macs(genes) <= high * 1e6:
                return genes
        return self.uniform(rng)
