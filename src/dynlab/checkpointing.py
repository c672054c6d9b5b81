"""Checkpoints that are never half-written, carry the RNG, and are laid out one folder per phase.

Layout of a run dir: `checkpoints/<phase>/last.ckpt` (resume point, rewritten during the phase),
`last.prev.ckpt` (the one before it), `best.ckpt`, `final.ckpt` + `done` once the phase finished.
A rerun of the same command resumes at the first phase without `done`, from its `last.ckpt`, or
from `last.prev.ckpt` when `last.ckpt` is damaged (a disk filled up, a copy cut short).
"""

from __future__ import annotations

import os
import pickle
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from dynlab.atomic import atomic_open
from dynlab.errors import CheckpointError
from dynlab.validation import checkpoint_problem

CHECKPOINTS = "checkpoints"
LAST, FINAL, DONE = "last.ckpt", "final.ckpt", "done"
# The resume point before the current `last.ckpt`, and where a damaged one is moved aside.
LAST_PREV, LAST_DAMAGED = "last.prev.ckpt", "last.damaged.ckpt"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` through a temp file in the target folder and an atomic rename.

    Lightning's own save goes through fsspec, whose local transaction writes the temp file to
    /tmp and moves it, which is a copy (not atomic) when /tmp is another filesystem.
    """
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose saves are atomic on local disks; a new `last.ckpt` keeps
    the one it replaces as `last.prev.ckpt`, the fallback if the new one turns out damaged."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        path = Path(path)
        if path.name == LAST and path.exists():
            keep_previous(path, path.with_name(LAST_PREV))
        atomic_torch_save(checkpoint, path)


def keep_previous(path: Path, previous: Path) -> None:
    """Make `previous` a copy of `path` without copying bytes (a hard link, renamed atomically
    over `previous`); where links are not supported, `path` itself becomes `previous`."""
    tmp = previous.with_name(f".{previous.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        os.replace(path, previous)
    else:
        os.replace(tmp, previous)


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
    """The checkpoint an unfinished phase resumes from, if it got that far.

    A damaged `last.ckpt` is moved aside (so the next save does not rotate it into
    `last.prev.ckpt`) and the phase resumes from `last.prev.ckpt`, saying so.
    """
    folder = phase_dir(run_dir, phase)
    last, previous = folder / LAST, folder / LAST_PREV
    if not last.exists():
        return previous if checkpoint_problem(previous) is None else None
    problem = checkpoint_problem(last)
    if problem is None:
        return last
    if checkpoint_problem(previous) is not None:
        raise CheckpointError(
            f"{last} is damaged ({problem}) and there is no good {LAST_PREV} to fall back to. "
            f"Delete {folder} to start phase '{phase}' again."
        )
    os.replace(last, folder / LAST_DAMAGED)
    print(
        f"[dynlab] {last} is damaged ({problem}); moved to {LAST_DAMAGED}, resuming phase "
        f"'{phase}' from {LAST_PREV}.",
        file=sys.stderr,
        flush=True,
    )
    return previous


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
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, pickle.UnpicklingError, EOFError, AttributeError) as err:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint: {err}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: a torch file, but no dynlab/Lightning checkpoint")
    module.on_load_checkpoint(checkpoint)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{path} does not fit this model (another technique, backbone or dataset?): "
            f"{str(err).splitlines()[0]}"
        ) from err


def load_static_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A static backbone's weights from a `technique=baseline` checkpoint or a plain state dict
    (what S2DNAS transforms and GFNet's encoders start from)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint)
    prefix = "model.net."  # BaselineModule keeps the backbone in StaticExits.net
    if any(key.startswith(prefix) for key in state):
        state = {
            key.removeprefix(prefix): value
            for key, value in state.items()
            if key.startswith(prefix)
        }
    return state
