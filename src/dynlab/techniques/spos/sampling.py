"""The supernet phase's path sampler (uniform, or the official MACs-binned rejection sampler) and
the evolution's draws of random candidates inside a MACs window."""

from __future__ import annotations

import math

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


class WindowSampler:
    """Uniform draws among the candidates whose MACs lie in [low, high] (MACs; None: no bound):
    the distribution of the official search's random fill (uniform candidates, each refused over
    the FLOPs limit, src/Search/search.py get_random), without its thousands of refused draws when
    the window holds a small share of the space.

    A candidate's MACs are a sum over its layers (`MacsTable`), so the candidates of layers i..
    are counted per MACs bucket, layer by layer, and each layer's (block, scale) choice is drawn in
    proportion to the number of completions that land in the window. The window is widened by the
    buckets' rounding and every draw is checked on its exact MACs (and drawn again when outside),
    so the draws are uniform over exactly the candidates inside the window."""

    def __init__(
        self,
        table: MacsTable,
        low: float | None,
        high: float | None,
        buckets: int = 10_000,
        tries: int = 100,
    ) -> None:
        self.table, self.low, self.high, self.tries = table, low, high, tries
        space = table.space
        self.options = [
            (b, s) for b in range(space.num_blocks) for s in range(max(space.num_scales, 1))
        ]
        costs = np.array([[layer[b][s] for b, s in self.options] for layer in table.layers])
        # Options a layer cannot take (identity where it cannot skip) are never counted or drawn.
        allowed = np.array(
            [[b < n for b, _ in self.options] for n in space.gene_choices()[: space.num_layers]]
        )
        costs = np.where(allowed, costs, np.nan)
        floor = np.nanmin(costs, axis=1)
        self.step = max(float((np.nanmax(costs, axis=1) - floor).sum()) / buckets, 1.0)
        # A disallowed option's shift is -1: skipped when counting, weight 0 when drawing.
        self.shifts = np.where(
            allowed, np.rint(np.nan_to_num(costs - floor[:, None]) / self.step), -1
        ).astype(np.int64)
        self.base = table.fixed + math.fsum(floor)
        slack = len(costs) / 2  # each entry's rounding is at most half a bucket
        top = int(self.shifts.max(axis=1).sum())
        self.lo = 0 if low is None else math.ceil((low - self.base) / self.step - slack)
        self.hi = top if high is None else math.floor((high - self.base) / self.step + slack)
        # counts[i][v]: the candidates of layers i.. whose buckets sum to v (floats: a 20-layer
        # space with channel search has 40^20 candidates).
        counts = [np.ones(1)]
        for shifts in self.shifts[::-1]:
            after = counts[-1]
            here = np.zeros(len(after) + int(shifts.max()))
            for shift, n in zip(*np.unique(shifts[shifts >= 0], return_counts=True), strict=True):
                here[shift : shift + len(after)] += n * after
            counts.append(here)
        self.counts = counts[::-1]
        self.share = self._inside(0, 0) / float(self.counts[0].sum())

    def _inside(self, layer: int, prefix: int) -> float:
        """Candidates of layers `layer`.. that complete `prefix` buckets into the window."""
        counts = self.counts[layer]
        a, b = max(self.lo - prefix, 0), min(self.hi - prefix + 1, len(counts))
        return float(counts[a:b].sum()) if a < b else 0.0

    def empty(self) -> bool:
        """Whether no candidate has its MACs in the window (widened by the rounding: exact)."""
        return self.share == 0.0

    def nearest(self) -> tuple[float | None, float | None]:
        """About the MACs of the nearest candidates below and above the window (None: none)."""
        held = np.flatnonzero(self.counts[0])
        below, above = held[held < self.lo], held[held > self.hi]
        return tuple(  # type: ignore[return-value]
            self.base + float(v[i]) * self.step if len(v) else None
            for v, i in ((below, -1), (above, 0))
        )

    def draw(self, rng: np.random.Generator) -> tuple[int, ...]:
        """A candidate drawn uniformly among those inside the window; one outside it (which the
        caller refuses) only when `tries` draws all fell in the rounding margin or the window is
        empty."""
        genes: tuple[int, ...] = ()
        for _ in range(self.tries):
            prefix, picks = 0, []
            for layer, shifts in enumerate(self.shifts):
                weights = np.array(
                    [self._inside(layer + 1, prefix + int(q)) if q >= 0 else 0.0 for q in shifts]
                )
                total = float(weights.sum())
                if total <= 0:  # an empty window: any candidate, refused by the caller
                    k = int(rng.choice(np.flatnonzero(shifts >= 0)))
                else:
                    k = int(np.searchsorted(np.cumsum(weights), rng.random() * total, "right"))
                    k = min(k, len(shifts) - 1)
                picks.append(self.options[k])
                prefix += int(shifts[k])
            arch = tuple(b for b, _ in picks)
            genes = arch + (tuple(s for _, s in picks) if self.table.space.num_scales else ())
            macs = self.table.macs(genes)
            if (self.low is None or macs >= self.low) and (self.high is None or macs <= self.high):
                return genes
        return genes
