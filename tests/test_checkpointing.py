"""Checkpoints: the previous last.ckpt is kept, a damaged one is skipped with a message, and a
file that is not a checkpoint (or not of this model) is a clear user error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dynlab import checkpointing as ckpt
from dynlab.errors import CheckpointError
from dynlab.runner import run_job

from .conftest import TINY


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_saving_last_keeps_the_previous_one(tmp_path):
    io = ckpt.AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, tmp_path / ckpt.LAST)
    io.save_checkpoint({"step": 2}, tmp_path / ckpt.LAST)
    io.save_checkpoint({"best": 1}, tmp_path / "best.ckpt")
    load = lambda name: torch.load(tmp_path / name, weights_only=False)  # noqa: E731
    assert load(ckpt.LAST) == {"step": 2} and load(ckpt.LAST_PREV) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.ckpt",
        "last.ckpt",
        "last.prev.ckpt",
    ]


def test_damaged_last_falls_back_to_the_previous_and_says_so(tmp_path, capsys):
    folder = ckpt.phase_dir(tmp_path, "train")
    io = ckpt.AtomicCheckpointIO()
    for step in (1, 2):
        io.save_checkpoint({"step": step}, folder / ckpt.LAST)
    assert ckpt.resume_path(tmp_path, "train") == folder / ckpt.LAST
    _truncate(folder / ckpt.LAST)
    assert ckpt.resume_path(tmp_path, "train") == folder / ckpt.LAST_PREV
    assert "last.ckpt is damaged" in capsys.readouterr().err
    # Moved aside: the next save must not rotate the damaged file over the good previous one.
    assert (folder / ckpt.LAST_DAMAGED).exists() and not (folder / ckpt.LAST).exists()
    io.save_checkpoint({"step": 3}, folder / ckpt.LAST)
    assert torch.load(folder / ckpt.LAST_PREV, weights_only=False) == {"step": 1}


def test_damaged_last_without_previous_is_a_clear_error(tmp_path):
    folder = ckpt.phase_dir(tmp_path, "train")
    ckpt.AtomicCheckpointIO().save_checkpoint({"step": 1}, folder / ckpt.LAST)
    _truncate(folder / ckpt.LAST)
    with pytest.raises(CheckpointError, match="damaged .* Delete .* to start phase 'train' again"):
        ckpt.resume_path(tmp_path, "train")
    assert ckpt.resume_path(tmp_path, "other") is None  # nothing yet: start from scratch


class _Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.model = nn.Linear(width, 2)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        pass


def test_loading_what_is_no_checkpoint_of_this_model_says_why(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        ckpt.load_module_state(_Net(3), text)
    torch.save({"weights": 1}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="no dynlab/Lightning checkpoint"):
        ckpt.load_module_state(_Net(3), tmp_path / "plain.pt")
    torch.save({"state_dict": _Net(5).state_dict()}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        ckpt.load_module_state(_Net(3), tmp_path / "other.ckpt")


def test_rerun_with_damaged_last_resumes_from_the_previous(compose_cfg, tmp_path, capsys):
    overrides = [*TINY, "trainer.max_epochs=2"]
    run = tmp_path / "run"
    run_job(compose_cfg(overrides, run_dir=run))
    folder = ckpt.phase_dir(run, "train")
    full = torch.load(folder / ckpt.FINAL, weights_only=False)
    previous = torch.load(folder / ckpt.LAST_PREV, weights_only=False)
    assert previous["epoch"] < full["epoch"]
    # As if the job died while the phase's last checkpoint was being copied: not done, damaged.
    (folder / ckpt.DONE).unlink()
    (folder / ckpt.FINAL).unlink()
    _truncate(folder / ckpt.LAST)
    capsys.readouterr()

    run_job(compose_cfg(overrides, run_dir=run))

    assert "resuming phase 'train' from last.prev.ckpt" in capsys.readouterr().err
    resumed = torch.load(folder / ckpt.FINAL, weights_only=False)
    assert resumed["global_step"] == full["global_step"]
    assert json.loads((run / "results.json").read_text())["status"] == "completed"
