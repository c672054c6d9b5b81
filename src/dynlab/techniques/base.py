"""What every technique's LightningModule shares: optimisation, metrics, phases, technique state.

A technique subclasses `DynlabModule`, builds `self.model` (an object answering the dynamic-model
protocol in `dynlab.protocol`), and implements `exit_losses` or overrides `training_step`.
Schedules (GFNet's three stages, S2DNAS's search -> retrain, ...) are lists of `Phase`s that the
train app runs in order, each with its own checkpoint folder, resuming at the first unfinished one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynlab.config import OptimConfig, OptimizerName, ScheduleName


class PhaseKind(StrEnum):
    fit = "fit"  # a Lightning `trainer.fit` over the datamodule
    custom = "custom"  # the technique's own loop (a search), run by `run_custom_phase`


@dataclass(frozen=True)
class Phase:
    """One step of a technique's schedule; `max_epochs=None` takes the trainer's setting."""

    name: str
    kind: PhaseKind = PhaseKind.fit
    max_epochs: int | None = None


@dataclass
class PhaseContext:
    """What a custom phase may use: where to write, the data, and how to build a trainer."""

    run_dir: Path
    phase_dir: Path
    datamodule: pl.LightningDataModule
    cfg: Any


class DynlabModule(pl.LightningModule):
    """Base LightningModule: SGD/AdamW with warm-up + cosine/step, top-1/top-5 per exit, phases."""

    def __init__(self, optim: OptimConfig | None = None) -> None:
        super().__init__()
        self.optim = optim or OptimConfig()
        self.model: nn.Module
        self.current_phase: str | None = None

    # --- the dynamic-model protocol, delegated to the technique's model -------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_exits(x)[-1]

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_exits(x)

    def exit_macs(self, input_size: tuple[int, int, int]) -> list[float]:
        return self.model.exit_macs(input_size)

    # --- phases -------------------------------------------------------------------------------
    def phases(self, mode: str) -> list[Phase]:
        """The schedule for `mode` ("train" or "search"); may grow as earlier phases finish."""
        if mode != "train":
            raise ValueError(
                f"technique {type(self).__name__} has no '{mode}' schedule; it only trains "
                "(use dynlab-train). Techniques with a search: s2dnas."
            )
        return [Phase("train")]

    def start_phase(self, phase: Phase) -> None:
        """Called before a phase runs (also when it resumes): freeze parts, switch losses, ..."""
        self.current_phase = phase.name

    def run_custom_phase(self, phase: Phase, ctx: PhaseContext) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no custom phase '{phase.name}'")

    # --- technique state (masks, search results, controller) travels in every checkpoint -------
    def technique_state(self) -> dict[str, Any]:
        """State beyond parameters and buffers that must survive a checkpoint; {} by default."""
        return {}

    def load_technique_state(self, state: dict[str, Any]) -> None:
        """Restore `technique_state()`; called before the weights are loaded (may rebuild the model)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dynlab"] = {"phase": self.current_phase, "technique": self.technique_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("dynlab", {})
        self.current_phase = state.get("phase", self.current_phase)
        self.load_technique_state(state.get("technique", {}))

    # --- training -----------------------------------------------------------------------------
    def exit_losses(self, logits: list[Tensor], y: Tensor) -> Tensor:
        """Training loss from the exits' logits; the last exit's cross-entropy by default."""
        return F.cross_entropy(logits[-1], y, label_smoothing=self.optim.label_smoothing)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.model.forward_exits(x)
        loss = self.exit_losses(logits, y)
        self.log("train/loss", loss, prog_bar=True, sync_dist=False)
        self.log("train/top1", _top1(logits[-1], y), prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate_batch(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate_batch(batch, "test")

    def _evaluate_batch(self, batch: tuple[Tensor, Tensor], split: str) -> None:
        """Loss and top-1/top-5 of the last exit, plus top-1 of every earlier exit (synced in DDP)."""
        x, y = batch
        logits = self.model.forward_exits(x)
        self.log(f"{split}/loss", F.cross_entropy(logits[-1], y), sync_dist=True)
        self.log(f"{split}/top1", _top1(logits[-1], y), prog_bar=True, sync_dist=True)
        if logits[-1].shape[1] >= 5:
            self.log(f"{split}/top5", _topk(logits[-1], y, 5), sync_dist=True)
        if len(logits) > 1:
            for k, lk in enumerate(logits, start=1):
                self.log(f"{split}/top1_exit{k}", _top1(lk, y), sync_dist=True)

    # --- optimisation -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters the current phase optimises (a technique may freeze parts in a phase)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        opt = build_optimizer(self, self.trainable_parameters(), o)
        steps_per_epoch = optimizer_steps_per_epoch(self.trainer)
        total = self.trainer.max_steps
        if total is None or total < 0:
            total = steps_per_epoch * max(1, self.trainer.max_epochs or 1)
        schedule = lr_lambda(o, total_steps=max(1, total), steps_per_epoch=steps_per_epoch)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def optimizer_steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimiser steps in one epoch, from the datamodule's train loader on this rank.

    Not `trainer.estimated_stepping_batches`: in Lightning 2.6 it sets up the fit loop's train
    loader before a resume restores it, and the loader's saved position is then never applied.
    """
    batches = len(trainer.datamodule.train_dataloader())
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif limit is not None:
        batches = int(batches * limit)
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


def build_optimizer(
    root: nn.Module, named: list[tuple[str, nn.Parameter]], optim: OptimConfig
) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or AdamW over `named`, weight decay split by `parameter_groups`."""
    groups = parameter_groups(root, named, optim)
    if optim.name == OptimizerName.sgd:
        return torch.optim.SGD(
            groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov
        )
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas))


def parameter_groups(
    root: nn.Module, named: list[tuple[str, nn.Parameter]], optim: OptimConfig
) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and norm weights + biases without weight decay."""
    if not optim.no_decay_norm_and_bias:
        return [{"params": [p for _, p in named], "weight_decay": optim.weight_decay}]
    norm_params = {
        id(p)
        for m in root.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
        for p in m.parameters(recurse=False)
    }
    decay, no_decay = [], []
    for name, p in named:
        (no_decay if id(p) in norm_params or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_lambda(optim: OptimConfig, total_steps: int, steps_per_epoch: float):
    """Multiplier of the base lr at each optimiser step: linear warm-up, then cosine/step/constant."""
    warmup = int(optim.warmup_epochs * steps_per_epoch)
    milestones = [int(m * total_steps) for m in optim.milestones]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.schedule == ScheduleName.cosine:
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if optim.schedule == ScheduleName.step:
            return optim.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return factor


def _top1(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(dim=1) == y).float().mean() * 100.0


def _topk(logits: Tensor, y: Tensor, k: int) -> Tensor:
    return (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).float().mean() * 100.0
