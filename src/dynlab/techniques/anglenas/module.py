"""`technique=anglenas`: AngleNAS's angle-based search space shrinking with SPOS as its base search.

Hu et al., "Angle-based Search Space Shrinking for Neural Architecture Search", ECCV 2020; official
code megvii-model/AngleNAS (SPOS/shrinking, SPOS/searching, SPOS/training). The schedule:
- `shrink` (fit): the supernet trains one path per step, each layer uniform over the operators it
  has left (official shrinking/train.py); after `shrinking.first_epochs` epochs, then every
  `shrinking.step_epochs`, the operators are scored by angle and the lowest dropped
  (`shrinking.py`), until the space holds at most `shrinking.stop_size` architectures; the phase
  then ends (its epochs, the length of the linear lr schedule, are an upper bound: official 250
  with 155-170 used). Weights, optimiser state and schedule carry on across drops (official
  SPOS/shrinking/main.py); the angles are taken from the initial weights, then from the weights once more than
  `reference_swap_drops` operators were dropped (official SPOS/shrinking/main.py l.137);
- `supernet` (fit): a fresh supernet trained on the shrunk space (official SPOS/searching/main.py);
- `evolution` (custom): SPOS's evolution over the shrunk space, random candidates uniform over
  each layer's operators left, refused outside the window (official SPOS/searching/search.py);
- `retrain` (fit): the winner from scratch.
The space is any SPOS supernet backbone (`cifar_spos_supernet_tiny`'s 1,024 paths, the
ShuffleNetV2 space of SPOS).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from dynlab.config import BackboneConfig
from dynlab.data.base import DataInfo
from dynlab.data.sampling import rank_and_world_size
from dynlab.search import derived_seed, seeded
from dynlab.search.supernet import PathScorer
from dynlab.techniques.anglenas.config import AngleNASConfig
from dynlab.techniques.anglenas.shrinking import AngleMeter, ShrunkSpace, lowest, score_operators
from dynlab.techniques.base import Phase
from dynlab.techniques.spos.module import PATH_STREAM, SUPERNET, SPOSModule
from dynlab.techniques.spos.search import SPOSEvolution

__all__ = ["AngleNASModule"]

SHRINK = "shrink"
# Seed streams beside SPOS's (0, 2, 3; the driver's 0 and 1; the ranking's 7, 8): the operators'
# scoring paths, the fresh supernet of the search, its validation path and its training paths.
SCORE_STREAM, FRESH_STREAM, SEARCH_VAL_STREAM, SEARCH_PATH_STREAM = 4, 5, 6, 10


class AngleNASModule(SPOSModule):
    """A supernet shrunk by angle while it trains, then SPOS on what is left."""

    phase_names = AngleNASConfig.PHASES
    technique = "anglenas"
    path_streams = {SHRINK: PATH_STREAM, SUPERNET: SEARCH_PATH_STREAM}

    config: AngleNASConfig

    def __init__(
        self, config: AngleNASConfig, backbone: BackboneConfig, data_info: DataInfo
    ) -> None:
        super().__init__(config, backbone, data_info)
        choices = self.space.gene_choices()
        layers = self.space.num_layers
        self.shrunk = ShrunkSpace.full(choices[:layers], choices[layers:])
        self.identity: int | None = self.space.identity_block
        self.shrink_steps: list[dict[str, Any]] = []
        # The angles' reference: the initial weights (a copy outside the module tree, so it is
        # neither trained nor saved as a parameter; `search_state` saves it during the shrink).
        self.__dict__["_reference"] = copy.deepcopy(self._supernet).requires_grad_(False)

    # --- phases -------------------------------------------------------------------------------
    def supernet_phases(self) -> list[Phase]:
        return [Phase(SHRINK), Phase(SUPERNET)]

    def draw_path(self, rng: np.random.Generator) -> tuple[int, ...]:
        return self.shrunk.sample(rng)

    def rank_candidate(self, rng: np.random.Generator) -> tuple[int, ...]:
        return self.shrunk.sample(rng)

    def contains(self, genes: Any) -> bool:
        return super().contains(genes) and self.shrunk.contains(genes)

    def rank_space(self) -> dict[str, Any]:
        return {**self.signature, "operations": self.shrunk.gene_values()}

    def check_run(self, cfg: Any) -> None:
        """The shrink phase's epochs reach the first drop."""
        super().check_run(cfg)
        if cfg is None or self.given:
            return
        epochs = self.recipe(SHRINK).epochs or cfg.get("trainer", {}).get("max_epochs")
        first = self.config.shrinking.first_epochs
        if epochs is not None and epochs > 0 and epochs < first:
            raise ValueError(
                f"anglenas: the shrink phase trains {epochs} epochs, fewer than "
                f"technique.shrinking.first_epochs={first}, so nothing would be dropped; set "
                f"technique.phases.shrink.epochs to at least {first} (plus "
                "technique.shrinking.step_epochs per further drop)"
            )

    def start_phase(self, phase: Phase) -> None:
        """The search's supernet starts fresh on the shrunk space (official SPOS/searching/main.py
        builds a new one; a resumed phase then loads its own weights)."""
        super().start_phase(phase)
        if phase.name == SUPERNET and not self.given:
            with seeded(derived_seed(self.config.seed, FRESH_STREAM)):
                self._supernet.reset_weights()
            rng = np.random.default_rng(derived_seed(self.config.seed, SEARCH_VAL_STREAM))
            self.val_path = self.shrunk.sample(rng)

    # --- the shrink phase ---------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        # A run resumed from the checkpoint written just before a drop makes that drop now (the
        # same one: the weights are those, the scoring paths come from (seed, step)).
        if self.current_phase == SHRINK:
            self._shrink_when_due(self.current_epoch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self.current_phase == SHRINK and self._shrunk_enough():
            return -1  # the rest of the epoch is skipped: the shrinking is over
        return None

    def on_train_epoch_end(self) -> None:
        if self.current_phase == SHRINK:
            self._shrink_when_due(self.current_epoch + 1)
            if self._shrunk_enough():
                self.trainer.should_stop = True

    def on_fit_end(self) -> None:
        super().on_fit_end()
        if self.current_phase == SHRINK and not self._shrunk_enough() and _rank_zero():
            print(
                f"[dynlab] anglenas: the shrink phase ended at {self.shrunk.size:.4g} "
                f"architectures, above technique.shrinking.stop_size="
                f"{self.config.shrinking.stop_size:g}; the search runs on that space (more "
                "technique.phases.shrink.epochs would shrink it further)"
            )

    def _shrunk_enough(self) -> bool:
        return self.shrunk.size <= self.config.shrinking.stop_size

    def _shrink_when_due(self, trained: int) -> None:
        """One drop when `trained` epochs reach the next one and the space is still too big."""
        cfg = self.config.shrinking
        due = cfg.first_epochs + len(self.shrink_steps) * cfg.step_epochs
        if trained >= due and not self._shrunk_enough():
            self._shrink_step(trained)

    def _shrink_step(self, trained: int) -> None:
        """Score every operator by angle and drop the lowest (official SPOS/shrinking/main.py, one ABS step)."""
        cfg = self.config.shrinking
        step = len(self.shrink_steps)
        rng = np.random.default_rng(derived_seed(self.config.seed, SCORE_STREAM, step))
        meter = AngleMeter(self._supernet, self._reference)
        cap = None if cfg.score_max_mmacs is None else cfg.score_max_mmacs * 1e6
        scores = score_operators(
            self.shrunk,
            meter.angle,
            rng,
            cfg.paths_per_operator,
            self.identity,
            self.table.macs,
            cap,
        )
        dropped = lowest(scores, self.shrunk, self._drops_per_step())
        self.shrunk.drop([op for op, _ in dropped])
        total = sum(len(s["dropped"]) for s in self.shrink_steps) + len(dropped)
        swapped = any(s["reference_swapped"] for s in self.shrink_steps)
        swap = (
            cfg.reference_swap_drops is not None
            and not swapped
            and total > cfg.reference_swap_drops
        )
        if swap:
            self._reference.load_state_dict(self._supernet.state_dict())
        self.shrink_steps.append(
            {
                "epoch": trained,
                "dropped": [[layer, choice, angle] for (layer, choice), angle in dropped],
                "size": self.shrunk.size,
                "reference_swapped": swap,
            }
        )
        if _rank_zero():
            ops = ", ".join(f"{layer}:{choice}" for (layer, choice), _ in dropped)
            print(
                f"[dynlab] anglenas: step {step + 1} after {trained} epochs dropped {ops}; the "
                f"space holds {self.shrunk.size:.4g} architectures"
                + ("; the angles' reference is now these weights" if swap else "")
            )

    def _drops_per_step(self) -> int:
        """`shrinking.drop_per_step`, else a layer's initial operators (identity aside) + 1."""
        if self.config.shrinking.drop_per_step is not None:
            return self.config.shrinking.drop_per_step
        return self.space.num_blocks - (self.identity is not None) + 1

    @property
    def _reference(self) -> nn.Module:
        return self.__dict__["_reference"]

    # --- the evolution on the shrunk space ----------------------------------------------------
    def evolution_search(self, scorer: PathScorer, data: dict[str, Any]) -> SPOSEvolution:
        """SPOS's evolution over the operators left; random candidates are uniform over them and
        refused outside the window (official SPOS/searching/search.py get_random)."""
        return ShrunkEvolution(
            self.shrinking_summary(),
            self.space,
            self.table,
            scorer,
            self.config.evolution,
            {**self.signature, "shrinking": self.shrinking_summary()},
            data,
            None,
            self._latency,
            gene_values=self.shrunk.gene_values(),
            name="anglenas",
        )

    def shrinking_summary(self) -> dict[str, Any]:
        """The operators left in each layer, the space's size and every drop."""
        return {
            "operations": [list(ops) for ops in self.shrunk.operations],
            "size": self.shrunk.size,
            "steps": copy.deepcopy(self.shrink_steps),
        }

    # --- technique state ----------------------------------------------------------------------
    def search_state(self) -> dict[str, Any]:
        state = {**super().search_state(), "shrinking": self.shrinking_summary()}
        if self.current_phase == SHRINK:  # the reference is needed until the shrink ends
            state["shrinking"]["reference"] = {
                k: v.detach().clone() for k, v in self._reference.state_dict().items()
            }
        return state

    def load_search_state(self, state: dict[str, Any]) -> None:
        super().load_search_state(state)
        shrinking = state.get("shrinking")
        if shrinking is None:
            return
        self.shrunk.operations = [list(ops) for ops in shrinking["operations"]]
        self.shrink_steps = list(shrinking["steps"])
        if "reference" in shrinking:
            self._reference.load_state_dict(shrinking["reference"])


class ShrunkEvolution(SPOSEvolution):
    """SPOS's evolution whose search_result.json also says how the space was shrunk."""

    def __init__(self, shrinking: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shrinking = shrinking

    def result(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {**super().result(records), "shrinking": self.shrinking}


def _rank_zero() -> bool:
    return rank_and_world_size()[0] == 0
