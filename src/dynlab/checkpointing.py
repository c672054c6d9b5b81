"""Checkpoints that are never half-written, carry the RNG, and are laid out one folder per phase.

Layout of a run dir: `checkpoints/<phase>/last.ckpt` (resume point, rewritten during the phase),
`best.ckpt`, `final.ckpt` + `done` once the phase finished. A rerun of the same command resumes
at the first phase without `done`, from its `last.ckpt`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from dynlab.atomic import atomic_open

CHECKPOINTS = "checkpoints"
LAST, FINAL, DONE = "last.ckpt", "final.ckpt", "done"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` through a temp file in the target folder and an atomic rename.

    Lightning's own save goes through fsspec, whose local transaction writes the temp file to
    /tmp and moves it, which is a copy (not atomic) when /tmp is another filesystem.
    """
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose saves are atomic on local disks."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        atomic_torch_save(checkpoint, path)


class RNGStateCallback(pl.Callback):
    """Saves Python, NumPy and torch RNG states with every checkpoint and puts them back right
    before the first batch after a resume, so random augmentations, dropout and sampled
    patches continue exactly as in an uninterrupted run."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        random.setstate(self._pending["python"])
        np.random.set_state(self._pending["numpy"])
        torch.set_rng_state(self._pending["torch"])
        if "cuda" in self._pending and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._pending["cuda"])
        self._pending = None


def phase_dir(run_dir: str | Path, phase: str) -> Path:
    return Path(run_dir) / CHECKPOINTS / phase


def is_done(run_dir: str | Path, phase: str) -> bool:
    return (phase_dir(run_dir, phase) / DONE).exists()


def resume_path(run_dir: str | Path, phase: str) -> Path | None:
    """The checkpoint an unfinished phase resumes from, if it got that far."""
    last = phase_dir(run_dir, phase) / LAST
    return last if last.exists() else None


def mark_done(run_dir: str | Path, phase: str) -> None:
    (phase_dir(run_dir, phase) / DONE).touch()


def save_module_state(module: pl.LightningModule, path: str | Path) -> None:
    """A phase's outcome without a trainer: weights plus the technique's own state."""
    checkpoint: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    atomic_torch_save(checkpoint, path)


def load_module_state(module: pl.LightningModule, path: str | Path) -> None:
    """Inverse of `save_module_state` (also reads Lightning checkpoints): technique state first,
    since it may rebuild the model, then the weights."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
