"""The dynamic-model protocol every technique answers (see DESIGN.md, "The dynamic-model protocol").

`forward_exits` gives logits at every exit, cheapest first; `exit_macs` gives the measured cumulative
MACs per sample to reach each exit; `exit_session` runs exits one at a time so that samples which
have exited leave the batch and later exits compute only on the rest (real early exit).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


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


class StaticExits(nn.Module):
    """Wraps any classifier as a one-exit dynamic model, so static baselines land on the same charts."""

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


def num_exits(model: DynamicModel, input_size: tuple[int, int, int]) -> int:
    """How many exits `model` has, found by one tiny forward pass."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))  # type: ignore[attr-defined]
    with torch.no_grad():
        return len(model.forward_exits(torch.zeros(1, *input_size, device=device)))
