"""What the weight-sharing searches (SPOS, FBNetV2) share as LightningModules: a supernet searched
by the technique's own phases, then the winner retrained from scratch as a standalone net; a given
architecture retrains alone. One name for a given architecture (`technique.architecture` or
`technique.architecture_file`, SupernetConfig), one check of a saved supernet's space, one state
format. The supernet's `child`/`standalone` builders are kept on the module, not as a submodule, so
a retrained module's checkpoint holds only the standalone net."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynlab.protocol import StaticExits
from dynlab.search import SupernetExits, derived_seed, read_architecture, seeded
from dynlab.techniques.base import DynlabModule, Phase
from dynlab.techniques.supernet_config import SupernetConfig

RETRAIN = "retrain"


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

    def phases(self, mode: str) -> list[Phase]:
        if self.given:
            if mode == "search":
                raise ValueError(
                    f"{self.technique}: technique.architecture is given, so there is nothing to "
                    "search; retrain it with dynlab-train"
                )
            return [Phase(RETRAIN)]
        if mode == "search":
            return self.search_phases()
        if mode == "train":
            return [*self.search_phases(), Phase(RETRAIN)]
        return super().phases(mode)

    def check_run(self, cfg: Any) -> None:
        """The schedule for the run's mode exists (a given architecture has nothing to search),
        and a `ckpt_path` holds a supernet of this space: refused here, before anything runs."""
        if cfg is None:
            return
        self.phases(cfg.get("mode", "train"))
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
