"""`technique=metapruning`: MetaPruning as one schedule of phases.

Liu et al., "MetaPruning: Meta Learning for Automatic Neural Network Channel Pruning", ICCV 2019;
official code liuzechun/MetaPruning. The channel space is the backbone (a PruningNet:
`dynlab.backbones.metapruning`). The schedule:
- `pruningnet` (fit): every step trains the PruningNet on one channel configuration for the whole
  global batch, every scale id drawn uniformly and independently, with no MACs filter (official
  {mobilenetv2,resnet}/training/train.py l.177-181); every rank draws the same from (seed, step);
- `evolution` (custom): the evolution SPOS shares (`dynlab.search.evolution`; official
  {mobilenetv2,resnet}/searching/search.py) under a MACs window on the search driver; each configuration's BN
  statistics are recalibrated on a fixed training subset and it is scored on the held-out val
  split (`PathScorer`), candidates on this job's ranks or one Slurm job array a generation;
- `retrain` (fit): the winner as a plain pruned network trained from scratch (official
  evaluating/).
`dynlab-search` runs the first two; `technique.architecture=[...]` (scale ids) retrains a given
configuration alone, `technique.uniform_mmacs` the uniform-width baseline under a MACs budget.
The deploy form is the pruned network: the retrained one, or the generated one of the winner
(`PruningNet.child`).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dynlab.backbones import BackboneArgumentError
from dynlab.backbones.metapruning import PruningNet
from dynlab.config import BackboneConfig
from dynlab.data.base import DataInfo, DynlabDataModule
from dynlab.data.sampling import rank_and_world_size
from dynlab.evaluation.macs import count_macs
from dynlab.search import SupernetExits, derived_seed
from dynlab.search.driver import SearchDriver, data_identity
from dynlab.search.evolution import Evolution, space_range_problem
from dynlab.search.evolution_report import publish_evolution
from dynlab.techniques.base import Phase, PhaseContext, PhaseKind, dataset_backbone
from dynlab.techniques.metapruning.config import MetaPruningConfig
from dynlab.techniques.supernet import SupernetTechnique
from dynlab.traits import backbone_needed

__all__ = ["MetaPruningModule"]

PRUNINGNET, EVOLUTION = "pruningnet", "evolution"
# Independent seed streams derived from the technique's seed; the search driver's are 0 and 1.
CONFIG_STREAM, VAL_CONFIG_STREAM, RETRAIN_STREAM = 2, 3, 4


class MetaPruningModule(SupernetTechnique):
    """A PruningNet, its evolutionary channel search and the retraining of the winner."""

    phase_names = MetaPruningConfig.PHASES
    technique, retrain_stream = "metapruning", RETRAIN_STREAM
    space_fields = "backbone, its kwargs, technique.scales and dataset"

    config: MetaPruningConfig

    def __init__(
        self, config: MetaPruningConfig, backbone: BackboneConfig, data_info: DataInfo
    ) -> None:
        super().__init__(config, backbone)
        kwargs = dict(backbone.kwargs)
        if config.scales is not None:
            kwargs["scales"] = list(config.scales)
        try:
            net = dataset_backbone(replace(backbone, kwargs=kwargs), data_info)
        except (TypeError, BackboneArgumentError) as err:  # no `scales` argument
            raise ValueError(backbone_needed("metapruning", backbone.name)) from err
        if not isinstance(net, PruningNet):
            raise ValueError(backbone_needed("metapruning", backbone.name))
        self.space, self.input_size = net.space, data_info.input_size
        self.__dict__["_supernet"] = net  # macs_of builds from it before use_supernet
        self._macs: dict[tuple[int, ...], float] = {}
        choices = self.space.gene_choices()
        smallest, largest = [0] * len(choices), [c - 1 for c in choices]
        problem = space_range_problem(
            self.macs_of(smallest), self.macs_of(largest), config.evolution, "metapruning"
        )
        if problem:
            raise ValueError(problem)
        self.search_summary: dict[str, Any] = {}
        self.architecture: tuple[int, ...] | None
        self.use_supernet(net)
        if not self.given:
            net.set_path(self._val_path)

    def macs_of(self, genes: Any) -> float:
        """MACs per image of the pruned network of `genes` (measured on meta, once per
        configuration): the widths only grow with each scale id, so the all-smallest and
        all-largest configurations span the space."""
        key = tuple(int(g) for g in genes)
        if key not in self._macs:
            with torch.device("meta"):
                net = self._supernet.standalone(key)
            self._macs[key] = float(count_macs(net, self.input_size))
        return self._macs[key]

    def uniform(self, max_mmacs: float) -> tuple[int, ...]:
        """The uniform-width baseline under a MACs budget: every gene the largest scale id whose
        configuration costs at most `max_mmacs` M MACs (a width multiplier, as the official
        README's uniform rows); ValueError when even the smallest costs more."""
        n, ids = self.space.num_genes, range(len(self.space.scales))
        inside = [i for i in ids if self.macs_of([i] * n) <= max_mmacs * 1e6]
        if not inside:
            low = self.macs_of([0] * n) / 1e6
            raise ValueError(
                f"metapruning: no uniform width costs at most {max_mmacs:g} M MACs (the "
                f"narrowest: {low:.3f} M)"
            )
        return (max(inside),) * n

    def _given_architecture(self) -> tuple[int, ...] | None:
        """`technique.uniform_mmacs`' uniform configuration, else the given architecture."""
        if self.config.uniform_mmacs is not None:
            return self.uniform(self.config.uniform_mmacs)
        return super()._given_architecture()

    def _draw(self, seed: int) -> tuple[int, ...]:
        """A configuration with every scale id uniform (official train.py: np.random.randint)."""
        rng = np.random.default_rng(seed)
        return tuple(int(g) for g in rng.integers(0, self.space.gene_choices()))

    # --- phases -------------------------------------------------------------------------------
    def supernet_phases(self) -> list[Phase]:
        return [Phase(PRUNINGNET)]

    def search_phases(self) -> list[Phase]:
        return [*self.supernet_phases(), Phase(EVOLUTION, PhaseKind.custom)]

    def rank_candidate(self, rng: np.random.Generator) -> tuple[int, ...]:
        """As the evolution's random candidates: inside the band when one is set, else every
        scale id uniform."""
        if self.config.random_band is not None:
            return self._draw_in_band(rng)
        return tuple(int(g) for g in rng.integers(0, self.space.gene_choices()))

    def run_custom_phase(self, phase: Phase, ctx: PhaseContext) -> None:
        if phase.name == EVOLUTION:
            self._evolution(ctx)
        else:
            super().run_custom_phase(phase, ctx)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if self.current_phase == PRUNINGNET:
            # The same configuration on every rank and after a resume: from (seed, global step).
            seed = derived_seed(self.config.seed, CONFIG_STREAM, self.global_step)
            self._supernet.set_path(self._draw(seed))
        return super().training_step(batch, batch_idx)

    def on_validation_start(self) -> None:
        if self.current_phase == PRUNINGNET and isinstance(self.model, SupernetExits):
            self._supernet.set_path(self._val_path)

    @functools.cached_property
    def _random_ids(self) -> list[int] | None:
        """[low, high] of `technique.random_band` (clipped to the grid, keeping its width), or None;
        computed once, as every random draw of the evolution reads it."""
        band, limit = self.config.random_band, self.config.evolution.max_mmacs
        if band is None or limit is None:
            return None
        top = len(self.space.scales) - 1
        low = min(max(self.uniform(limit)[0] - band // 2, 0), max(top + 1 - band, 0))
        return [low, min(low + band - 1, top)]

    def _draw_in_band(self, rng: np.random.Generator) -> tuple[int, ...]:
        """A random candidate: every scale id uniform over `_random_ids` (official ResNet search)."""
        ids = self._random_ids
        assert ids is not None
        return tuple(int(g) for g in rng.integers(ids[0], ids[1] + 1, self.space.num_genes))

    @functools.cached_property
    def _val_path(self) -> tuple[int, ...]:
        """The one configuration the PruningNet is validated on, the same every epoch."""
        return self._draw(derived_seed(self.config.seed, VAL_CONFIG_STREAM))

    # --- the evolution phase ------------------------------------------------------------------
    def _evolution(self, ctx: PhaseContext) -> None:
        cfg, datamodule = self.config.evolution, ctx.datamodule
        assert isinstance(datamodule, DynlabDataModule) and isinstance(self.model, SupernetExits)
        scorer = self.path_scorer(datamodule)
        search = Evolution(
            self.space.gene_choices(),
            self.macs_of,
            scorer,
            cfg,
            {**self.signature, "random_band": self._random_ids},
            data_identity(datamodule),
            draw_random=self._draw_in_band if self.config.random_band is not None else None,
            name="metapruning",
        )
        outcome = SearchDriver(search, ctx.phase_dir, self.config.seed, cfg.candidates_on).run()
        self.architecture = tuple(outcome.result["architecture"])
        # The PruningNet stays on the winner with its recalibrated statistics: a search-only
        # run's test evaluation and deploy form are that pruned network.
        scorer.use(self.architecture)
        plan = self._supernet.plan(self.architecture)
        self.search_summary = {
            **{k: v for k, v in outcome.result.items() if k != "pareto"},
            "widths": plan,
        }
        if rank_and_world_size()[0] == 0:
            publish_evolution(
                outcome,
                "metapruning",
                ctx.phase_dir,
                ctx.run_dir,
                ctx.loggers,
                self.search_summary,
            )

    # --- technique state ----------------------------------------------------------------------
    def architecture_problem(self, architecture: Any) -> str | None:
        return self.space.problem(architecture)

    def parse_architecture(self, architecture: Any) -> tuple[int, ...]:
        return tuple(int(g) for g in architecture)

    def search_state(self) -> dict[str, Any]:
        return {"path": list(self._supernet.active()), "search": self.search_summary}

    def load_search_state(self, state: dict[str, Any]) -> None:
        self.search_summary = state.get("search", {})
        self._supernet.set_path(tuple(state["path"]))
