"""Brief training of a candidate network on the datamodule's real loaders.

Why a Lightning Trainer and not a loop of our own: the fit phases already run through Lightning,
which brings the loader workers and pinned memory (from the datamodule), mixed precision on GPU
(the configured `precision`), gradient clipping, and the optimiser and schedule steps. A second,
hand-written loop would have to copy all of that and drift from it. The Trainer here is the
lightest one: one device (this rank's: under DDP, ranks train different candidates), no logger,
no checkpointing, no progress bar, no validation; building it costs milliseconds, not the seconds
of a fit phase's logger and callbacks. The candidate's `training_step` is the technique's loss on
the exits, and its optimiser and schedule come from `dynlab.optim`, as in a fit phase.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.environments import LightningEnvironment
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dynlab.config import OptimConfig
from dynlab.optim import build_optimizer, build_scheduler
from dynlab.preemption import SignalRecorder

ExitLoss = Callable[[list[Tensor], Tensor], Tensor]


class CandidateModule(pl.LightningModule):
    """A candidate network (`forward_exits`) trained with `loss(exit logits, targets)`."""

    def __init__(self, model: nn.Module, loss: ExitLoss, optim: OptimConfig) -> None:
        super().__init__()
        self.model, self.loss, self.optim = model, loss, optim

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return self.loss(self.model.forward_exits(x), y)  # type: ignore[operator]

    def configure_optimizers(self) -> dict[str, Any]:
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        optimizer = build_optimizer(self, named, self.optim)
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = total / max(1, self.trainer.max_epochs or 1)
        schedule = build_scheduler(optimizer, self.optim, total, per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@dataclass(frozen=True)
class CandidateTrainer:
    """Where and how candidates train: this rank's device, the run's precision on GPU."""

    accelerator: str = "cpu"
    device_index: int = 0
    precision: str | int = "32-true"
    gradient_clip_val: float | None = None

    @classmethod
    def from_trainer_config(cls, trainer: Mapping[str, Any] | None) -> CandidateTrainer:
        """From the run's `trainer` config: its GPU (this rank's) and precision, else the CPU."""
        trainer = trainer or {}
        if trainer.get("accelerator", "auto") == "cpu" or not torch.cuda.is_available():
            return cls(gradient_clip_val=trainer.get("gradient_clip_val"))
        return cls(
            accelerator="gpu",
            device_index=torch.cuda.current_device(),
            precision=trainer.get("precision") or "32-true",
            gradient_clip_val=trainer.get("gradient_clip_val"),
        )

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.device_index) if self.accelerator == "gpu" else "cpu"

    def trainer(self, epochs: int, batches_per_epoch: int | None) -> pl.Trainer:
        """A single-device Trainer that only trains (a fresh one per candidate)."""
        return pl.Trainer(
            accelerator=self.accelerator,
            devices=[self.device_index] if self.accelerator == "gpu" else 1,
            precision=self.precision,  # type: ignore[arg-type]
            max_epochs=epochs,
            limit_train_batches=batches_per_epoch,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            gradient_clip_val=self.gradient_clip_val,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            # Not Slurm's environment: under srun it would expect one process per task here.
            plugins=[LightningEnvironment()],
            callbacks=[SignalRecorder()],  # a signal waits for the candidate boundary
        )


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the per-Trainer banner lines and small-data warnings (one Trainer per candidate)."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="pytorch_lightning")
            warnings.filterwarnings("ignore", module="lightning_fabric")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def train_candidate(
    model: nn.Module,
    loss: ExitLoss,
    optim: OptimConfig,
    loader: DataLoader,
    epochs: int,
    batches_per_epoch: int | None,
    trainer: CandidateTrainer,
) -> nn.Module:
    """Train `model` for `epochs` (at most `batches_per_epoch` batches each) on `loader`, with the
    technique's optimiser and schedule; returns it on the trainer's device, in eval mode."""
    module = CandidateModule(model, loss, optim)
    with _quiet():
        trainer.trainer(epochs, batches_per_epoch).fit(module, train_dataloaders=loader)
    return model.to(trainer.device).eval()
