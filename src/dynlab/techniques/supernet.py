"""What the weight-sharing searches (SPOS, FBNetV2) share as LightningModules: a supernet searched
by the technique's own phases, then the winner retrained from scratch as a standalone net; a given
architecture retrains alone; `dynlab-rank` trains the supernet and measures how well it ranks
architectures (`rank`, `search/ranking.py`). One name for a given architecture (`technique.architecture` or
`technique.architecture_file`, SupernetConfig), one check of a saved supernet's space, one state
format. The supernet's `child`/`standalone` builders are kept on the module, not as a submodule, so
a retrained module's checkpoint holds only the standalone net."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dynlab.data.base import DynlabDataModule
from dynlab.data.sampling import rank_and_world_size
from dynlab.errors import ConfigError
from dynlab.protocol import StaticExits
from dynlab.search import (
    CandidateTrainer,
    SupernetExits,
    derived_seed,
    read_architecture,
    seeded,
)
from dynlab.search.driver import SearchDriver, data_identity
from dynlab.search.ranking import AloneTrainer, RankingStudy, params_on_meta, ranking_table
from dynlab.search.supernet import PathScorer
from dynlab.techniques.base import DynlabModule, Phase, PhaseContext, PhaseKind, plain
from dynlab.techniques.supernet_config import SupernetConfig

RETRAIN, RANK = "retrain", "rank"
RANKING = "ranking.md"


class SupernetTechnique(DynlabModule):
    """Schedules `search_phases() + [retrain]` (dynlab-search: the search phases alone), or
    `[retrain]` when the architecture is given; `architecture` is the search's winner or the given
    one, `retrain_stream` the seed stream the standalone net is initialised from."""

    technique = ""  # its name in messages
    retrain_stream = 0
    old_state_key = ""  # where checkpoints of earlier dynlab versions kept the architecture
    space_fields = ""  # the settings that fix the space, named when a saved one differs

    config: SupernetConfig

    def use_supernet(self, net: nn.Module) -> None:
        """Keep `net`'s builders and its space's signature, and set the model: the standalone net
        of a given architecture (checked against the space), else the supernet itself."""
        self.__dict__["_supernet"] = net
        self.signature: dict[str, Any] = net.signature()  # type: ignore[operator]
        self.architecture = self._given_architecture()
        self.given = self.architecture is not None
        self.model = self._standalone(self.architecture) if self.given else SupernetExits(net)

    # --- what each supernet technique says of its architectures --------------------------------
    def architecture_problem(self, architecture: Any) -> str | None:
        """Why `architecture` (as a config or search_result.json gives it) is none of this space's
        (one line), or None."""
        raise NotImplementedError

    def parse_architecture(self, architecture: Any) -> Any:
        """A checked architecture in the form the technique uses (SPOS: a tuple of genes)."""
        return architecture

    def search_state(self) -> dict[str, Any]:
        """The technique's own part of the checkpointed state (its search's progress)."""
        return {}

    def load_search_state(self, state: dict[str, Any]) -> None:
        """Restore `search_state()`'s part, before the standalone net is rebuilt."""
        return None

    def _given_architecture(self) -> Any | None:
        """The config's architecture, or its file's; ValueError in one line when it is none of the
        space's."""
        option, architecture = "technique.architecture", self.config.architecture
        if architecture is None and self.config.architecture_file is not None:
            option = "technique.architecture_file"
            architecture = read_architecture(
                self.config.architecture_file, f"{self.technique} {option}"
            )
        if architecture is None:
            return None
        problem = self.architecture_problem(architecture)
        if problem:
            raise ValueError(f"{self.technique} {option}: {problem}")
        return self.parse_architecture(architecture)

    @property
    def _supernet(self) -> Any:
        return self.__dict__["_supernet"]

    def search_phases(self) -> list[Phase]:
        raise NotImplementedError

    def supernet_phases(self) -> list[Phase]:
        """The phases that train the supernet (what a ranking needs before it runs)."""
        raise NotImplementedError

    # --- what a ranking asks of the technique (`dynlab-rank`) ---------------------------------
    def rank_candidate(self, rng: np.random.Generator) -> tuple[int, ...]:
        """One architecture drawn uniformly from the space the technique searches."""
        raise NotImplementedError

    def macs_of(self, genes: Any) -> float:
        """MACs per image of the architecture `genes`."""
        raise NotImplementedError

    def contains(self, genes: Any) -> bool:
        """Whether `genes` is an architecture of the space the technique searches."""
        return self.architecture_problem(genes) is None

    def rank_space(self) -> dict[str, Any]:
        """What fixes the ranked space, for the ranking's identity."""
        return self.signature

    def path_scorer(self, datamodule: DynlabDataModule) -> PathScorer:
        """Scores an architecture with inherited weights as the technique's evolution does (BN
        recalibrated, then top-1 on held-out val; settings: `technique.evolution`)."""
        assert isinstance(self.model, SupernetExits)
        key = f"{self.technique}/recalibration"
        settings = self.config.evolution  # type: ignore[attr-defined]
        return PathScorer.on(self.model, datamodule, key, settings, str(self.device))

    def phases(self, mode: str) -> list[Phase]:
        if self.given:
            if mode in ("search", "rank"):
                raise ValueError(
                    f"{self.technique}: technique.architecture is given, so there is nothing to "
                    f"{mode}; retrain it with dynlab-train"
                )
            return [Phase(RETRAIN)]
        if mode == "search":
            return self.search_phases()
        if mode == "rank":
            return [*self.supernet_phases(), Phase(RANK, PhaseKind.custom)]
        if mode == "train":
            return [*self.search_phases(), Phase(RETRAIN)]
        return super().phases(mode)

    def check_run(self, cfg: Any) -> None:
        """The schedule for the run's mode exists (a given architecture has nothing to search),
        and a `ckpt_path` holds a supernet of this space: refused here, before anything runs."""
        if cfg is None:
            return
        self.phases(cfg.get("mode", "train"))
        if cfg.get("mode") == "rank":
            self._ranked_architectures()
        path = cfg.get("ckpt_path")
        if not path or not Path(path).is_file():
            return
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        saved = state.get("dynlab", {}).get("technique", {}).get("space")
        if saved is not None:
            self.check_space(saved, f"ckpt_path {path}")

    def check_space(self, saved: dict[str, Any], where: str) -> None:
        """ValueError naming every setting that differs when `saved` is another space's."""
        if saved == self.signature:
            return
        diff = ", ".join(
            f"{k}: {saved.get(k)!r} there, {self.signature.get(k)!r} here"
            for k in sorted(set(saved) | set(self.signature))
            if saved.get(k) != self.signature.get(k)
        )
        raise ValueError(
            f"{self.technique}: {where} holds a supernet of another search space ({diff}); run "
            f"with the {self.space_fields} it was trained with"
        )

    def run_custom_phase(self, phase: Phase, ctx: PhaseContext) -> None:
        if phase.name == RANK:
            self._rank(ctx)
        else:
            super().run_custom_phase(phase, ctx)

    def _rank(self, ctx: PhaseContext) -> None:
        """The ranking study on the driver; ranking.md in the run dir."""
        cfg, datamodule = self.config.ranking, ctx.datamodule
        assert isinstance(datamodule, DynlabDataModule)
        trainer = CandidateTrainer.from_trainer_config(ctx.cfg.trainer if ctx.cfg else None)
        optim = dict(self.recipe(RETRAIN).optimizers).get("main", self.config.optim)
        val_images = self.config.evolution.val_images  # type: ignore[attr-defined]
        data = data_identity(datamodule)
        recipe = {
            "optim": plain(optim),
            "epochs": cfg.epochs,
            "batches_per_epoch": cfg.batches_per_epoch,
            "val_images": val_images,
            "precision": str(trainer.precision),
        }
        key = {"space": self.signature, "data": data, "seed": self.config.seed, **recipe}
        alone = AloneTrainer(
            self._supernet.standalone,
            datamodule,
            optim,
            cfg.epochs,
            cfg.batches_per_epoch,
            val_images,
            self.config.seed,
            trainer,
            key,
            cfg.alone_cache,
        )
        study = RankingStudy(
            self.rank_candidate,
            self.contains,
            self.path_scorer(datamodule),
            alone,
            self.macs_of,
            partial(params_on_meta, self._supernet.standalone),
            cfg,
            self.rank_space(),
            data,
            self._ranked_architectures(),
        )
        outcome = SearchDriver(study, ctx.phase_dir, self.config.seed, cfg.candidates_on).run()
        # The supernet is left on its pick of the sample (recalibrated): the run's test score.
        study.inherited.use(tuple(outcome.result["architecture"]))
        if rank_and_world_size()[0] == 0:
            title = f"How well the {self.technique} supernet ranks architectures"
            table = ranking_table(outcome.result, title)
            for folder in (ctx.run_dir, ctx.phase_dir):
                (Path(folder) / RANKING).write_text(table)
            print(table)

    def _ranked_architectures(self) -> list[list[int]] | None:
        """The architectures of `technique.ranking.architectures_file`, or None."""
        path = self.config.ranking.architectures_file
        if path is None:
            return None
        option = f"{self.technique} technique.ranking.architectures_file={path}"
        try:
            ranked = json.loads(Path(path).read_text())["architectures"]
            return [list(a["genes"]) for a in ranked]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(
                f"{option}: not a ranking's search_result.json (checkpoints/rank/...): {err}"
            ) from err

    # --- technique state ----------------------------------------------------------------------
    def technique_state(self) -> dict[str, Any]:
        architecture = self.architecture
        return {
            "space": self.signature,
            "architecture": list(architecture) if isinstance(architecture, tuple) else architecture,
            "standalone": isinstance(self.model, StaticExits),
            **self.search_state(),
        }

    def load_technique_state(self, state: dict[str, Any]) -> None:
        """Check the space, take the searched architecture (unless one is given), restore the
        search's state, then rebuild the standalone net when the saved model is one."""
        if not state:
            return
        self.check_space(state["space"], "the checkpoint")
        saved = state.get("architecture", state.get(self.old_state_key))
        if not self.given and saved is not None:
            self.architecture = self.parse_architecture(saved)
        self.load_search_state(state)
        self._restore_standalone(state)

    def start_phase(self, phase: Phase) -> None:
        """The retrain phase starts from a fresh standalone net of the architecture (a resumed
        one already has it, with its weights)."""
        super().start_phase(phase)
        if phase.name == RETRAIN and not isinstance(self.model, StaticExits):
            if self.architecture is None:
                raise RuntimeError(f"{self.technique} retrain: the search set no architecture")
            self.model = self._standalone(self.architecture).to(self.device)

    def _restore_standalone(self, state: dict[str, Any]) -> None:
        """In `load_technique_state`: rebuild the standalone net when the checkpoint holds one."""
        if state.get("standalone") and not isinstance(self.model, StaticExits):
            self.model = self._standalone(self.architecture).to(self.device)

    def _standalone(self, architecture: Any) -> StaticExits:
        """A fresh standalone net of `architecture` (affine BN), from its own seed stream."""
        with seeded(derived_seed(self.config.seed, self.retrain_stream)):  # type: ignore[attr-defined]
            return StaticExits(self._supernet.standalone(architecture))
