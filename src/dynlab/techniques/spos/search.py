"""SPOS's evolution phase on the search driver: how a path is scored (as the official tester) and
what its search_result.json adds to the evolution's (the winner's blocks and scales, the space's
MACs span and the window searched), plus the Pareto table it prints."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader

from dynlab.backbones.spos_shufflenetv2 import MacsTable, SearchSpace
from dynlab.data.base import DynlabDataModule, StreamSpec
from dynlab.search import SupernetExits, exit_accuracies, recalibrate_bn, val_exit_probs
from dynlab.search.driver import for_array_task
from dynlab.search.evolution import Evolution, Genes, Record
from dynlab.techniques.spos.latency import SPOSLatency
from dynlab.techniques.spos.sampling import WindowSampler
from dynlab.techniques.supernet_config import EvolutionConfig

__all__ = ["PathScorer", "SPOSEvolution", "pareto_markdown", "window_sampler"]


@dataclass
class PathScorer:
    """Scores one path of the supernet as the official Search/tester.py does: BN statistics
    recalibrated on a fixed training subset (`recalibration`, `batches` batches), then top-1 on the
    first `val_images` of the held-out val split. Pickles, so a Slurm array task can run it."""

    model: SupernetExits
    datamodule: DynlabDataModule
    recalibration: StreamSpec
    batches: int
    val_images: int | None
    device: str = "cpu"
    # The two loaders, made at the first candidate and reused (their workers with them).
    _loaders: dict[str, DataLoader] = field(default_factory=dict, repr=False, compare=False)

    def __call__(self, genes: Genes) -> dict[str, Any]:
        start = time.perf_counter()
        self.use(genes)
        probs, targets = val_exit_probs(self.model, self._loader("val"))
        return {
            "top1": exit_accuracies(probs, targets)[0],
            "seconds": time.perf_counter() - start,
        }

    def use(self, genes: Genes) -> None:
        """Set the supernet to the path `genes`, with BN statistics recalibrated for it."""
        self.model.to(self.device)
        self.model.net.set_path(genes)  # type: ignore[operator]
        recalibrate_bn(self.model, self._loader("recalibration"), self.batches)

    def _loader(self, which: str) -> DataLoader:
        if which not in self._loaders:
            self._loaders[which] = (
                self.datamodule.whole_val_loader(self.val_images)
                if which == "val"
                else self.datamodule.stream_loader(self.recalibration)
            )
        return self._loaders[which]

    def detached(self) -> PathScorer:
        """A copy for a Slurm array task: the supernet on the CPU until the task moves it to its
        own GPU (index 0), the datamodule without the controller's Trainer and splits, no loaders."""
        model = copy.deepcopy(self.model.cpu())
        self.model.to(self.device)
        device = "cuda:0" if torch.device(self.device).type == "cuda" else "cpu"
        datamodule = for_array_task(self.datamodule)
        return replace(self, model=model, datamodule=datamodule, device=device, _loaders={})


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
    ) -> None:
        super().__init__(
            space.gene_choices(),
            table.macs,
            scorer,
            cfg,
            {**signature, **({"latency_table": latency.device()} if latency else {})},
            data,
            window.draw if window is not None else None,
            partial(latency.ms, space=space) if latency is not None else None,
            name="spos",
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

    def for_task(self) -> SPOSEvolution:
        task = copy.copy(self)
        assert isinstance(self.evaluate, PathScorer)
        task.evaluate = self.evaluate.detached()
        return task

    def gpus_per_task(self) -> int:
        assert isinstance(self.evaluate, PathScorer)
        return int(torch.device(self.evaluate.device).type == "cuda")


def pareto_markdown(front: list[dict[str, Any]]) -> str:
    """The Pareto front as a markdown table, cheapest first."""
    lines = ["| M MACs | supernet val top-1 | genes |", "| ---: | ---: | --- |"]
    lines += [f"| {r['mmacs']:.2f} | {r['top1']:.2f} | {r['genes']} |" for r in front]
    return "\n".join(lines) + "\n"


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
