"""What the weight-sharing searches (SPOS, FBNetV2) share as LightningModules: a supernet searched
by the technique's own phases, then the winner retrained from scratch as a standalone net; a given
architecture retrains alone. The supernet's `child`/`standalone` builders are kept on the module,
not as a submodule, so a retrained module's checkpoint holds only the standalone net."""

from __future__ import annotations

from typing import Any

from torch import nn

from dynlab.protocol import StaticExits
from dynlab.search import SupernetExits, derived_seed, seeded
from dynlab.techniques.base import DynlabModule, Phase

RETRAIN = "retrain"


class SupernetTechnique(DynlabModule):
    """Schedules `search_phases() + [retrain]` (dynlab-search: the search phases alone), or
    `[retrain]` when the architecture is given; `architecture` is the search's winner or the given
    one, `retrain_stream` the seed stream the standalone net is initialised from."""

    technique = ""  # its name in messages
    given_option = "technique.arch"  # the config field that gives an architecture
    retrain_stream = 0

    def use_supernet(self, net: nn.Module, architecture: Any | None) -> None:
        """Keep `net`'s builders and set the model: the standalone net of a given architecture,
        else the supernet itself."""
        self.__dict__["_supernet"] = net
        self.given = architecture is not None
        self.architecture = architecture
        self.model = self._standalone(architecture) if self.given else SupernetExits(net)

    @property
    def _supernet(self) -> Any:
        return self.__dict__["_supernet"]

    def search_phases(self) -> list[Phase]:
        raise NotImplementedError

    def phases(self, mode: str) -> list[Phase]:
        if self.given:
            if mode == "search":
                raise ValueError(
                    f"{self.technique}: {self.given_option} is "
                    "given, so there is nothing to search; retrain it with dynlab-train"
                )
            return [Phase(RETRAIN)]
        if mode == "search":
            return self.search_phases()
        if mode == "train":
            return [*self.search_phases(), Phase(RETRAIN)]
        return super().phases(mode)

    def check_run(self, cfg: Any) -> None:
        """The schedule for the run's mode exists (a given architecture has nothing to search):
        refused here, before anything is built or trained."""
        if cfg is not None:
            self.phases(cfg.get("mode", "train"))

    def start_phase(self, phase: Phase) -> None:
        """The retrain phase starts from a fresh standalone net of the architecture (a resumed
        one already has it, with its weights)."""
        super().start_phase(phase)
        if phase.name == RETRAIN and not isinstance(self.model, StaticExits):
            if self.architecture is None:
                raise RuntimeError(f"{self.technique} retrain: the search set no architecture")
            self.model = self._standalone(self.architecture).to(self.device)

    def restore_standalone(self, state: dict[str, Any]) -> None:
        """In `load_technique_state`: rebuild the standalone net when the checkpoint holds one."""
        if state.get("standalone") and not isinstance(self.model, StaticExits):
            self.model = self._standalone(self.architecture).to(self.device)

    def _standalone(self, architecture: Any) -> StaticExits:
        """A fresh standalone net of `architecture` (affine BN), from its own seed stream."""
        with seeded(derived_seed(self.config.seed, self.retrain_stream)):  # type: ignore[attr-defined]
            return StaticExits(self._supernet.standalone(architecture))
