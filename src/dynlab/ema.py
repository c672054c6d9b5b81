"""An exponential moving average of the weights for a phase (`technique.phases.<name>.ema`).

Lightning's EMAWeightAveraging keeps the average, shows it to validation, checkpoints it and puts
it into the model when the phase ends. Averaging every buffer would blur what must stay exact:
binary pruning masks (CondenseNetV2's sparsification) and integer counters. Those are copied from
the live model after every update instead.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EMAWeightAveraging

from dynlab.config import EMAConfig
from dynlab.optim import matches


class EMA(EMAWeightAveraging):
    """EMAWeightAveraging whose masks and non-float buffers follow the live model exactly."""

    def __init__(self, cfg: EMAConfig) -> None:
        if not 0.0 < cfg.decay < 1.0:
            raise ValueError(f"ema.decay must be in (0, 1), got {cfg.decay}")
        super().__init__(decay=cfg.decay, use_buffers=True)
        self.copy_patterns = list(cfg.copy_buffers)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._copy_exact_buffers(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._copy_exact_buffers(pl_module)

    def _copy_exact_buffers(self, pl_module: pl.LightningModule) -> None:
        if self._average_model is None:
            return
        live = dict(pl_module.named_buffers())
        for name, averaged in self._average_model.module.named_buffers():
            if not averaged.is_floating_point() or matches(name, self.copy_patterns):
                averaged.copy_(live[name])
