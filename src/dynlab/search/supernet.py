"""A weight-sharing supernet as a dynamic model, for every technique that searches one (SPOS's
one-shot supernet, FBNetV2's DMaskingNAS supernet)."""

from __future__ import annotations

from typing import Self

from torch import Tensor, nn

from dynlab.protocol import DynamicNet, ExitSession, SingleExitSession, StaticExits


class SupernetExits(DynamicNet):
    """The supernet `net` as a one-exit model running the sub-network it is set to (`net.active()`:
    SPOS's path, FBNetV2's argmax). Its deploy form is that sub-network cut out with the supernet's
    weights and BN statistics (`net.child(net.active())`), a standalone net with BN folded."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return [self.net(x)]

    def exit_macs(self, input_size: tuple[int, int, int]) -> list[float]:
        return self.deploy().exit_macs(input_size)

    def exit_session(self, x: Tensor) -> ExitSession:
        return SingleExitSession(self.net, x)

    def deploy(self) -> Self:
        device = next(self.net.parameters()).device
        active = self.net.active()  # type: ignore[operator]
        child = StaticExits(self.net.child(active)).to(device).eval()  # type: ignore[operator]
        return child.deploy()  # type: ignore[return-value]
