"""PreemptionHandler: a signal mid-training saves last.ckpt, stops the fit, maybe requeues the job,
and resuming from that checkpoint ends on exactly the weights of an uninterrupted run.

The signal is sent by the process to itself from inside a training or validation step, so it lands
at a chosen point; delivery from another process (scancel) is covered by tests/test_slurm.py.
"""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from dynlab.checkpointing import AtomicCheckpointIO, RNGStateCallback
from dynlab.data.sampling import ResumableDataLoader, ResumableLoaderCallback, ResumableSampler
from dynlab.preemption import Preempted, PreemptionHandler, job_signals, slurm_job_id

BATCHES_PER_EPOCH, EPOCHS, BATCH = 4, 3, 8


class Points(Dataset[tuple[Tensor, Tensor]]):
    """A fixed regression set indexed by the `(index, sample_seed)` keys of a ResumableSampler."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(BATCHES_PER_EPOCH * BATCH, 6, generator=gen)
        self.y = torch.randn(BATCHES_PER_EPOCH * BATCH, 1, generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        return self.x[key[0]], self.y[key[0]]


class TinyRegression(pl.LightningModule):
    """Dropout (global RNG), Adam (optimizer state) and a per-epoch schedule: all must resume.

    Sends `signum` to its own process at training step `signal_at_step`, or during the
    validation of epoch `signal_at_val_epoch`.
    """

    def __init__(
        self,
        signum: int = signal.SIGUSR1,
        signal_at_step: int | None = None,
        signal_at_val_epoch: int | None = None,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
        self.signum, self.signal_at_step, self.signal_at_val_epoch = (
            signum,
            signal_at_step,
            signal_at_val_epoch,
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if self.global_step == self.signal_at_step:
            os.kill(os.getpid(), self.signum)
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        if self.current_epoch == self.signal_at_val_epoch and batch_idx == 0:
            os.kill(os.getpid(), self.signum)
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> dict:
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}

    def train_dataloader(self) -> ResumableDataLoader:
        return loader(ResumableSampler(len(Points()), seed=3))

    def val_dataloader(self) -> ResumableDataLoader:
        return loader(ResumableSampler(len(Points()), seed=4))


def loader(sampler: ResumableSampler) -> ResumableDataLoader:
    """A loader with its own generator: creating its iterator (every epoch) leaves the global RNG,
    and so dropout after a resume at an epoch end, alone."""
    return ResumableDataLoader(
        Points(), batch_size=BATCH, sampler=sampler, generator=torch.Generator()
    )


def fit(root: Path, module: TinyRegression, ckpt_path: Path | None = None) -> dict[str, Tensor]:
    """Train `module` as dynlab's runner does (resumable loader, RNG and atomic checkpoints)."""
    pl.seed_everything(0)
    trainer = pl.Trainer(
        default_root_dir=root,
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[ResumableLoaderCallback(), RNGStateCallback(), PreemptionHandler()],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, ckpt_path=ckpt_path, weights_only=False)  # RNG states are not tensors
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tensor]:
    return fit(tmp_path_factory.mktemp("uninterrupted"), TinyRegression())


@pytest.fixture(autouse=True)
def outside_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(
    "where",
    [
        {"signal_at_step": 5},  # mid-epoch
        {"signal_at_step": BATCHES_PER_EPOCH - 1},  # last batch of the first epoch
        {"signal_at_val_epoch": 1},  # during validation
        {"signal_at_step": 6, "signum": signal.SIGTERM},
    ],
    ids=["mid-epoch", "epoch-end", "validation", "sigterm"],
)
def test_resumed_run_reaches_the_uninterrupted_weights(
    tmp_path: Path, uninterrupted: dict[str, Tensor], where: dict
) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    with pytest.raises(Preempted):
        fit(tmp_path, TinyRegression(**where))
    assert {s: signal.getsignal(s) for s in before} == before, "handlers must be restored"
    last = tmp_path / "last.ckpt"
    assert last.exists()
    stopped_at = torch.load(last, weights_only=False)["global_step"]
    assert 0 < stopped_at < EPOCHS * BATCHES_PER_EPOCH

    resumed = fit(tmp_path, TinyRegression(), ckpt_path=last)

    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`scontrol` and `squeue` on PATH: scontrol records its arguments in the returned file,
    squeue reports the job state in $FAKE_JOB_STATE."""
    calls, bin_dir = tmp_path / "scontrol-calls", tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in [("scontrol", f'echo "$@" >> {calls}'), ("squeue", 'echo "$FAKE_JOB_STATE"')]:
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


@pytest.mark.parametrize(
    ("signum", "job_state", "requeued"),
    [
        (signal.SIGUSR1, "RUNNING", True),  # time limit ahead
        (signal.SIGTERM, "RUNNING", True),  # preemption: the job still runs in its grace time
        (signal.SIGTERM, "COMPLETING", False),  # scancel
    ],
    ids=["time-limit", "preemption", "scancel"],
)
def test_requeues_the_array_task_unless_it_is_being_cancelled(
    tmp_path: Path,
    fake_slurm: Path,
    monkeypatch: pytest.MonkeyPatch,
    signum: int,
    job_state: str,
    requeued: bool,
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "43")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("FAKE_JOB_STATE", job_state)
    with pytest.raises(Preempted, match="requeued Slurm job 41_2" if requeued else "not requeued"):
        fit(tmp_path, TinyRegression(signum=signum, signal_at_step=2))
    calls = fake_slurm.read_text() if fake_slurm.exists() else ""
    assert calls == ("requeue 41_2\n" if requeued else "")


def test_slurm_job_id() -> None:
    assert slurm_job_id({"SLURM_JOB_ID": "7"}) == "7"
    assert (
        slurm_job_id({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1"})
        == "7_1"
    )
    assert slurm_job_id({}) is None


def test_a_signal_between_phases_stops_the_next_fit_at_its_first_batch(tmp_path: Path) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    with pytest.raises(Preempted, match="step 1;"), job_signals():
        os.kill(os.getpid(), signal.SIGUSR1)  # after one phase ended, before the next one starts
        fit(tmp_path, TinyRegression())
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 1
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(Preempted, match="after the last phase"), job_signals():
        os.kill(os.getpid(), signal.SIGTERM)  # after the last phase: stop before evaluating
