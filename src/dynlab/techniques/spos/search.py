"""SPOS's evolution phase on the search driver: how a path is scored (as the official tester) and
what its search_result.json adds to the evolution's (the winner's blocks and scales, the space's
MACs span and the window searched), plus the Pareto table it prints."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from dynlab.backbones.spos_shufflenetv2 import MacsTable, SearchSpace
from dynlab.search.evolution import Evolution, Record
from dynlab.search.supernet import PathScorer
from dynlab.techniques.spos.latency import SPOSLatency
from dynlab.techniques.spos.sampling import WindowSampler
from dynlab.techniques.supernet_config import EvolutionConfig

__all__ = ["SPOSEvolution", "window_sampler"]


class SPOSEvolution(Evolution):
    """The evolution over an SPOS space, scoring paths with a `PathScorer`."""

    def __init__(
        self,
        space: SearchSpace,
        table: MacsTable,
        scorer: PathScorer,
        cfg: EvolutionConfig,
        signature: dict[str, Any],
        data: dict[str, Any],
        window: WindowSampler | None,
        latency: SPOSLatency | None = None,
        gene_values: Sequence[Sequence[int]] | None = None,
        name: str = "spos",
    ) -> None:
        super().__init__(
            space.gene_choices(),
            table.macs,
            scorer,
            cfg,
            {**signature, **({"latency_table": latency.table.timed_on()} if latency else {})},
            data,
            window.draw if window is not None else None,
            partial(latency.ms, space=space) if latency is not None else None,
            name=name,
            gene_values=gene_values,
        )
        self.space, self.table, self.window = space, table, window

    def result(self, records: Sequence[Record]) -> dict[str, Any]:
        result = super().result(records)
        blocks, scales = self.space.split(tuple(result["architecture"]))
        return {
            **result,
            "blocks": list(blocks),
            "scales": list(scales) if scales is not None else None,
            "space": {
                "minimum_mmacs": self.table.minimum() / 1e6,
                "maximum_mmacs": self.table.maximum() / 1e6,
            },
            # The MACs window searched and about what share of the space's candidates it holds.
            "window": {
                "min_mmacs": self.cfg.min_mmacs,
                "max_mmacs": self.cfg.max_mmacs,
                "share": self.window.share if self.window is not None else 1.0,
            },
        }


def window_sampler(table: MacsTable, cfg: EvolutionConfig) -> WindowSampler | None:
    """The evolution's random draws inside its MACs window (None without one); ValueError naming
    the nearest candidates when no candidate of the space lies inside it."""
    if cfg.min_mmacs is None and cfg.max_mmacs is None:
        return None
    low, high = (None if b is None else b * 1e6 for b in (cfg.min_mmacs, cfg.max_mmacs))
    window = WindowSampler(table, low, high)
    if window.empty():
        below, above = (f"{m / 1e6:.3f} M" if m is not None else "none" for m in window.nearest())
        raise ValueError(
            f"spos evolution: no architecture of the space has its MACs inside the window "
            f"[min_mmacs={cfg.min_mmacs}, max_mmacs={cfg.max_mmacs}] (the nearest have about "
            f"{below} below and {above} above); widen evolution.min_mmacs/max_mmacs"
        )
    return window
