"""Stop a run at the first non-finite training loss, before a checkpoint can store the damage.

Without it, `technique.optim.lr=1e8` trains to the end on NaNs, overwrites `last.ckpt` with NaN
weights and reports status "completed". `DivergenceGuard` checks the loss every training step
(returned by `training_step` under automatic optimisation, or logged as `train/loss` by a
technique that optimises manually) and the weights of every checkpoint before it is written.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from dynlab.errors import TrainingDiverged

LOSS_KEY = "train/loss"
HINT = (
    "Try a lower learning rate (technique.optim.lr=...), gradient clipping "
    "(trainer.gradient_clip_val=1.0) or a warm-up"
)


class DivergenceGuard(pl.Callback):
    """Raises `TrainingDiverged` (one line: phase, epoch, step, what to try) on a NaN/inf loss.

    The first non-finite step is recorded on the loss's device, without waiting for it; it is read
    back every step on a single CPU process, and every `check_every` steps, before validation and
    at epoch end on accelerators and under DDP (a read stalls the GPU's queue; the check across
    ranks is a collective). Checkpoints never wait for it: their weights are checked instead.
    """

    def __init__(self, check_every: int = 16) -> None:
        self.check_every = check_every
        self._first_step: Tensor | None = None  # global step of the first non-finite loss; -1: none
        self._first_loss: Tensor | None = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = step_loss(outputs, trainer.callback_metrics)
        if loss is not None:
            self._record(loss, trainer.global_step)
        if self._due(trainer):
            self._check(trainer, pl_module)

    def _due(self, trainer: pl.Trainer) -> bool:
        """Read the flag back now? Every step on one CPU process (free), else every few."""
        single_cpu = trainer.world_size == 1 and trainer.strategy.root_device.type == "cpu"
        return single_cpu or trainer.global_step % self.check_every == 0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module)

    def _record(self, loss: Tensor, step: int) -> None:
        """Remember the first step whose loss is not finite, on the loss's device (no sync)."""
        loss = loss.detach().float().reshape(())
        if self._first_step is None or self._first_step.device != loss.device:
            self._first_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._first_loss = torch.zeros((), device=loss.device)
        new = ~torch.isfinite(loss) & (self._first_step < 0)
        self._first_step = torch.where(new, step, self._first_step)
        self._first_loss = torch.where(new, loss, self._first_loss)

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = int(self._first_step) if self._first_step is not None else -1
        bad = step >= 0
        if trainer.world_size > 1:
            # A NaN on one rank must stop every rank, or the others wait in the next all-reduce.
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        loss = f"{float(self._first_loss):g}" if step >= 0 else "non-finite on another rank"
        where = _where(trainer, pl_module, step if step >= 0 else trainer.global_step)
        raise TrainingDiverged(
            f"training diverged in {where}: the loss is {loss}. {HINT}; {_kept(trainer)}."
        )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A step can turn the weights non-finite with a finite loss: never save such a state."""
        bad = next(
            (
                name
                for name, value in checkpoint.get("state_dict", {}).items()
                if isinstance(value, Tensor)
                and value.is_floating_point()
                and not bool(torch.isfinite(value).all())
            ),
            None,
        )
        if bad is not None:
            raise TrainingDiverged(
                f"training diverged in {_where(trainer, pl_module, trainer.global_step)}: {bad} "
                f"holds NaN/inf values, so it was not checkpointed. {HINT}; {_kept(trainer)}."
            )


def step_loss(outputs: Any, logged: dict[str, Any]) -> Tensor | None:
    """This step's loss: what `training_step` returned, else the `train/loss` it logged."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    for value in (outputs, logged.get(LOSS_KEY)):
        if isinstance(value, Tensor) and value.numel() == 1:
            return value
    return None


def _kept(trainer: pl.Trainer) -> str:
    """Which checkpoint survives: the last one written (before the loss went bad), if any."""
    callback = trainer.checkpoint_callback
    last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    return f"the last finite checkpoint is kept: {last}" if last else "no checkpoint was written"


def _where(trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> str:
    phase = getattr(pl_module, "current_phase", None) or "?"
    return f"phase '{phase}', epoch {trainer.current_epoch}, step {step}"
