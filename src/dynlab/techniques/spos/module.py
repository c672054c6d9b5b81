"""`technique=spos`: Single Path One-Shot NAS as one schedule of phases.

Guo et al., "Single Path One-Shot Neural Architecture Search with Uniform Sampling", ECCV 2020;
official code megvii-model/SinglePathOneShot. The search space is the backbone (`spos_supernet`,
`cifar_spos_supernet`: `dynlab.backbones.spos_shufflenetv2`). The schedule:
- `supernet` (fit): every step trains one path for the whole global batch; every rank draws the
  same path from (seed, global step), and the choices off the path have no gradient, so SGD gives
  them no momentum and no weight decay (their grads are cleared after DDP's all-reduce);
- `evolution` (custom): the official evolutionary search under a MACs window on the search driver
  (`dynlab.search.driver`); each candidate has its BN statistics recalibrated on a fixed training
  subset and is scored on the fixed held-out val split, candidates spread over the ranks or sent
  out as one Slurm job array a generation (`technique.evolution.candidates_on`), checkpointed every round;
- `retrain` (fit): the winner built standalone with affine BN and trained from scratch.
`dynlab-search` runs the first two; `technique.architecture=[...]` (or `_file`) retrains a
given architecture alone. The deploy form is always a standalone net: the retrained one, or the
supernet's path cut out with its weights (`SPOSSupernet.child`).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dynlab.backbones import BackboneArgumentError
from dynlab.backbones.spos_shufflenetv2 import MacsTable, SPOSSupernet
from dynlab.config import BackboneConfig
from dynlab.data.base import DataInfo, DynlabDataModule, StreamSpec
from dynlab.data.sampling import rank_and_world_size
from dynlab.errors import ConfigError
from dynlab.search import SupernetExits, derived_seed, recalibrate_bn
from dynlab.search.driver import SearchDriver, data_identity
from dynlab.search.evolution import space_range_problem
from dynlab.search.evolution_report import publish_evolution
from dynlab.search.latency_table import TimingConfig, latency_summary
from dynlab.search.supernet import PathScorer
from dynlab.techniques.base import Phase, PhaseContext, PhaseKind, dataset_backbone
from dynlab.techniques.spos.config import SPOSConfig
from dynlab.techniques.spos.latency import SPOSLatency
from dynlab.techniques.spos.sampling import PathSampler
from dynlab.techniques.spos.search import SPOSEvolution, window_sampler
from dynlab.techniques.supernet import RETRAIN, SupernetTechnique
from dynlab.traits import backbone_needed

__all__ = ["SPOSModule"]

SUPERNET, EVOLUTION = "supernet", "evolution"
# Independent seed streams derived from the technique's seed (`dynlab.search.derived_seed`); the
# search driver's are 0 (candidates, whose scores draw nothing) and 1 (the evolution's draws).
PATH_STREAM, VAL_PATH_STREAM, RETRAIN_STREAM = 0, 2, 3


class SPOSModule(SupernetTechnique):
    """A one-shot supernet, its evolutionary search and the retraining of the winner."""

    phase_names = SPOSConfig.PHASES
    technique, retrain_stream, old_state_key = "spos", RETRAIN_STREAM, "arch"
    # The fit phases that train the supernet one path per step, and the seed stream of each one's
    # paths.
    path_streams: dict[str, int] = {SUPERNET: PATH_STREAM}
    space_fields = "backbone, its kwargs, technique.channel_search and dataset"

    config: SPOSConfig

    def __init__(self, config: SPOSConfig, backbone: BackboneConfig, data_info: DataInfo) -> None:
        super().__init__(config, backbone)
        kwargs = dict(backbone.kwargs)
        if config.channel_search is not None:  # None: the backbone's own setting
            kwargs["channel_search"] = config.channel_search
        try:
            net = dataset_backbone(replace(backbone, kwargs=kwargs), data_info)
        except (TypeError, BackboneArgumentError) as err:  # no `channel_search` argument
            raise ValueError(backbone_needed(self.technique, backbone.name)) from err
        if not callable(getattr(net, "macs_table", None)):  # a one-shot supernet of this family
            raise ValueError(backbone_needed(self.technique, backbone.name))
        self.space = net.space
        self.table: MacsTable = net.macs_table(data_info.input_size)
        lo, hi = self.table.minimum(), self.table.maximum()
        problem = space_range_problem(lo, hi, config.evolution, self.technique)
        if problem:
            raise ValueError(problem)
        self.window = window_sampler(self.table, config.evolution)
        self.sampler = PathSampler(self.space, self.table, config.sampler)
        self.search_summary: dict[str, Any] = {}
        # The search's winner or the given architecture (genes).
        self.architecture: tuple[int, ...] | None
        self.use_supernet(net)
        if not self.given:
            self.val_path = self.sampler.uniform(
                np.random.default_rng(derived_seed(config.seed, VAL_PATH_STREAM))
            )
            net.set_path(self.val_path)

    # --- phases -------------------------------------------------------------------------------
    def supernet_phases(self) -> list[Phase]:
        return [Phase(SUPERNET)]

    def search_phases(self) -> list[Phase]:
        return [*self.supernet_phases(), Phase(EVOLUTION, PhaseKind.custom)]

    def draw_path(self, rng: np.random.Generator) -> tuple[int, ...]:
        """The path one supernet step trains (the configured sampler)."""
        return self.sampler.sample(rng)

    def rank_candidate(self, rng: np.random.Generator) -> tuple[int, ...]:
        return self.sampler.uniform(rng)

    def macs_of(self, genes: Any) -> float:
        return self.table.macs(genes)

    def run_custom_phase(self, phase: Phase, ctx: PhaseContext) -> None:
        if phase.name == EVOLUTION:
            self._evolution(ctx)
        else:
            super().run_custom_phase(phase, ctx)

    def check_run(self, cfg: Any) -> None:
        """Also a time window that holds none of the space's architectures on this machine: its
        latency table is built (or read from the cache) now, before anything trains."""
        super().check_run(cfg)
        if not self.given:
            _ = self._latency  # built (or read from the cache) and checked now, kept for the run

    # --- the supernet phase: one path per step ------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        stream = self.path_streams.get(self.current_phase)  # type: ignore[arg-type]
        if stream is not None:
            # Same path on every rank and after a resume: drawn from (seed, stream, global step).
            rng = np.random.default_rng(derived_seed(self.config.seed, stream, self.global_step))
            self._supernet.set_path(self.draw_path(rng))
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Choices off the path get no update: their grads are None (DDP's all-reduce may have
        filled them with zeros), which SGD skips, momentum and weight decay included."""
        if self.current_phase not in self.path_streams:
            return
        arch, _ = self.space.split(self._supernet.path)
        for layer, chosen in enumerate(arch):
            for block, params in enumerate(self._choice_params[layer]):
                if block != chosen:
                    for p in params:
                        p.grad = None

    @functools.cached_property
    def _choice_params(self) -> list[list[list[nn.Parameter]]]:
        """The parameters of every choice of every layer, listed once (not per step)."""
        net = self._supernet
        return [
            [net.layer_params(layer, block) for block in range(self.space.num_blocks)]
            for layer in range(self.space.num_layers)
        ]

    def on_validation_start(self) -> None:
        """The supernet is validated on one fixed path (the same every epoch)."""
        if self.current_phase in self.path_streams and isinstance(self.model, SupernetExits):
            self._supernet.set_path(self.val_path)

    def on_fit_end(self) -> None:
        """After retraining, BN statistics as an exact average over one pass of the augmented
        train split, the same on every rank (official Evaluation train.py's final `bn_process`
        epoch at lr 0); deterministic, so a resumed run that repeats it gets the same."""
        if self.current_phase != RETRAIN or not self.config.retrain_bn_recalibration:
            return
        datamodule = self.trainer.datamodule  # type: ignore[attr-defined]
        stream = StreamSpec("spos/retrain_bn", sharded=False)
        recalibrate_bn(self.model, datamodule.stream_loader(stream))

    # --- the evolution phase ------------------------------------------------------------------
    def _evolution(self, ctx: PhaseContext) -> None:
        cfg, datamodule = self.config.evolution, ctx.datamodule
        assert isinstance(datamodule, DynlabDataModule) and isinstance(self.model, SupernetExits)
        scorer = self.path_scorer(datamodule)
        search = self.evolution_search(scorer, data_identity(datamodule))
        outcome = SearchDriver(search, ctx.phase_dir, self.config.seed, cfg.candidates_on).run()
        self.architecture = tuple(outcome.result["architecture"])
        # Leave the supernet on the winner with its recalibrated statistics: a search-only run's
        # test evaluation and deploy form are that child.
        scorer.use(self.architecture)
        self.search_summary = {k: v for k, v in outcome.result.items() if k != "pareto"}
        if _rank_zero():
            publish_evolution(
                outcome,
                self.technique,
                ctx.phase_dir,
                ctx.run_dir,
                ctx.loggers,
                self.search_summary,
            )

    def evolution_search(self, scorer: PathScorer, data: dict[str, Any]) -> SPOSEvolution:
        """The evolution over the whole space, random candidates drawn inside the window."""
        return SPOSEvolution(
            self.space,
            self.table,
            scorer,
            self.config.evolution,
            self.signature,
            data,
            self.window,
            self._latency,
        )

    @functools.cached_property
    def _latency(self) -> SPOSLatency | None:
        """The space's latency table on this machine when the evolution has a time window (built
        once per device and cached), checked against the window; else None."""
        cfg = self.config.evolution
        if cfg.min_latency_ms is None and cfg.max_latency_ms is None:
            return None
        if not isinstance(self._supernet, SPOSSupernet):
            raise ConfigError(
                f"{self.technique}: a time window (technique.evolution.min/max_latency_ms) needs "
                "the ShuffleNetV2 space's latency table; this space has none: use a MACs window"
            )
        timing = TimingConfig(threads=cfg.latency_threads)
        latency = SPOSLatency.build(self._supernet, self.table.input_size, timing)
        problem = latency.window_problem(cfg.min_latency_ms, cfg.max_latency_ms)
        if problem:
            raise ConfigError(problem)
        if _rank_zero():
            print(latency_summary("spos", latency.table, latency.span()))
        return latency

    # --- technique state ----------------------------------------------------------------------
    def architecture_problem(self, architecture: Any) -> str | None:
        return self.space.problem(architecture)

    def parse_architecture(self, architecture: Any) -> tuple[int, ...]:
        return tuple(int(g) for g in architecture)

    def search_state(self) -> dict[str, Any]:
        return {"path": list(self._supernet.path), "search": self.search_summary}

    def load_search_state(self, state: dict[str, Any]) -> None:
        self.search_summary = state.get("search", {})
        self._supernet.set_path(tuple(state["path"]))


def _rank_zero() -> bool:
    return rank_and_world_size()[0] == 0
