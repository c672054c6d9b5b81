"""The dynamic-model protocol every technique answers (docs/ARCHITECTURE.md, same heading).

`forward_exits` gives logits at every exit, cheapest first; `exit_macs` gives the measured
cumulative MACs per sample to reach each exit; `exit_session` runs exits one at a time so that
samples which have exited leave the batch and later exits compute only on the rest (real early
exit); `deploy` gives the inference network with the same exits and outputs, which evaluation
runs on; `export_stages` gives that deploy form as one module per exit, the exit decision left
between them (dynlab.evaluation.export). `DynamicNet`, the base of the techniques' models, gives
`forward`, the shared `deploy` and the one-stage export of a one-exit network.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Protocol, Self, runtime_checkable

from torch import Tensor, nn

from dynlab.nn.reparam import fold_and_merge


class ExitSession(Protocol):
    """Incremental evaluation of one batch: call `next_exit()` K times, `keep()` in between."""

    num_exits: int

    def next_exit(self) -> Tensor:
        """Logits of the next exit for the samples still in the batch."""
        ...

    def keep(self, mask: Tensor) -> None:
        """Drop the samples where `mask` is False from all further computation."""
        ...


@runtime_checkable
class DynamicModel(Protocol):
    def forward_exits(self, x: Tensor) -> list[Tensor]: ...

    def exit_macs(self, input_size: tuple[int, int, int]) -> list[float]: ...

    def exit_session(self, x: Tensor) -> ExitSession: ...

    def deploy(self) -> DynamicModel: ...


class ExitStage(nn.Module):
    """What `export_stages` gives per exit: `forward(image, *carried)` returns
    `(logits, *carried_next)`, where `carried` is what later stages reuse (feature maps, recurrent
    states) and every tensor has the batch first, so samples that exit are dropped from all of
    them between two stages. The first stage is called with the image alone."""


class LastExit(ExitStage):
    """The whole (one-exit) network as one stage that carries nothing."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor) -> tuple[Tensor]:
        return (self.net(image),)


class DynamicNet(nn.Module):
    """Base of a technique's model: `forward` is the last exit, `deploy` folds BatchNorm.

    Subclasses implement `forward_exits`, `exit_macs` and `exit_session`. A technique with its own
    inference conversion (SFR's group conv + index, RepVGG/ACNet branch fusion, a searched child
    as a standalone net) overrides `deploy`, starting from `super().deploy()` (BN already folded).
    """

    deployed: bool = False  # True on the network `deploy()` returns

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_exits(x)[-1]

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def exit_macs(self, input_size: tuple[int, int, int]) -> list[float]:
        raise NotImplementedError

    def exit_session(self, x: Tensor) -> ExitSession:
        raise NotImplementedError

    def deploy(self) -> Self:
        """The inference form: an eval-mode copy with every BatchNorm that follows a conv (on any
        exit's path) folded into it and every re-parameterisable block (ACNet, RepVGG, FReLU)
        converted; same exits, same outputs. A deploy form returns itself."""
        if self.deployed:
            return self
        net = copy.deepcopy(self)
        fold_and_merge(net, method="forward_exits")  # ACNet/RepVGG into one conv each
        net.deployed = True
        return net.requires_grad_(False)

    def export_stages(self) -> list[ExitStage]:
        """This network as one `ExitStage` per exit (call it on the deploy form). A one-exit
        network is one stage; a multi-exit technique overrides this (the exporter refuses a
        network whose stages are fewer than its exits)."""
        return [LastExit(self)]


class SingleExitSession:
    """The session of a static model: one exit, nothing to drop."""

    num_exits = 1

    def __init__(self, model: nn.Module, x: Tensor) -> None:
        self._model, self._x, self._done = model, x, False

    def next_exit(self) -> Tensor:
        if self._done:
            raise RuntimeError("a static model has a single exit")
        self._done = True
        return self._model(self._x)

    def keep(self, mask: Tensor) -> None:
        self._x = self._x[mask]


class StagedSession:
    """The session of any network given as stages (`DynamicNet.export_stages`, or an export's
    graphs): stage k runs on the image and what stage k-1 carried, for the samples still in."""

    def __init__(self, stages: Sequence[Callable[..., Sequence[Tensor]]], x: Tensor) -> None:
        self._stages, self._image, self._carried, self._done = stages, x, (), 0
        self.num_exits = len(stages)

    def next_exit(self) -> Tensor:
        if self._done == self.num_exits:
            raise RuntimeError(f"all {self.num_exits} stages have run")
        logits, *carried = self._stages[self._done](self._image, *self._carried)
        self._carried, self._done = tuple(carried), self._done + 1
        return logits

    def keep(self, mask: Tensor) -> None:
        self._image = self._image[mask]
        self._carried = tuple(t[mask] for t in self._carried)


class StaticExits(DynamicNet):
    """Any classifier as a one-exit dynamic model, so static baselines land on the same charts."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return [self.net(x)]

    def exit_macs(self, input_size: tuple[int, int, int]) -> list[float]:
        from dynlab.evaluation.macs import count_macs

        return [float(count_macs(self.net, input_size))]

    def exit_session(self, x: Tensor) -> ExitSession:
        return SingleExitSession(self.net, x)
