"""A weight-sharing supernet as a dynamic model, for every technique that searches one (SPOS's
one-shot supernet, FBNetV2's DMaskingNAS supernet, MetaPruning's PruningNet), and how one
candidate of it is scored (`PathScorer`)."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Self

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dynlab.data.base import DynlabDataModule, StreamSpec
from dynlab.protocol import DynamicNet, ExitSession, SingleExitSession, StaticExits
from dynlab.search.bn import recalibrate_bn
from dynlab.search.driver import for_array_task
from dynlab.search.scoring import exit_accuracies, val_exit_probs


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


@dataclass
class PathScorer:
    """Scores one candidate of a supernet (`net.set_path(genes)`: SPOS's path, MetaPruning's
    channel configuration) as the official SPOS Search/tester.py and MetaPruning searching/
    search.py do: BN statistics recalibrated on a fixed training subset (`recalibration`, `batches`
    batches), then top-1 on the first `val_images` of the held-out val split. Pickles, so a Slurm
    array task can run it."""

    model: SupernetExits
    datamodule: DynlabDataModule
    recalibration: StreamSpec
    batches: int
    val_images: int | None
    device: str = "cpu"
    # The two loaders, made at the first candidate and reused (their workers with them).
    _loaders: dict[str, DataLoader] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def on(
        cls,
        model: SupernetExits,
        datamodule: DynlabDataModule,
        key: str,
        settings: Any,
        device: str,
    ) -> PathScorer:
        """The scorer of a search whose `settings` give `recalibration_batches`,
        `recalibration_batch_size` and `val_images`: BN statistics from the fixed training subset
        `key` (the same images in the same order on every rank, without augmentation; the
        official SPOS tester.py and MetaPruning search.py use augmented train batches: fixing the
        images makes scores comparable)."""
        batches, batch_size = settings.recalibration_batches, settings.recalibration_batch_size
        available = len(datamodule.stream_indices(StreamSpec(key)))
        stream = StreamSpec(
            key,
            size=min(available, batches * batch_size),
            augment=False,
            shuffle=False,
            sharded=False,
            batch_size=batch_size,
        )
        return cls(model, datamodule, stream, batches, settings.val_images, device)

    def __call__(self, genes: Sequence[int]) -> dict[str, Any]:
        start = time.perf_counter()
        self.use(genes)
        probs, targets = val_exit_probs(self.model, self._loader("val"))
        return {
            "top1": exit_accuracies(probs, targets)[0],
            "seconds": time.perf_counter() - start,
        }

    def use(self, genes: Sequence[int]) -> None:
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
