"""Preemption-safe training: dynlab's `PreemptionHandler` is the one owner of Slurm's signals.

Slurm warns a job before its time limit with the `--signal` it asked for (dynlab asks for SIGUSR1,
see slurm/README.md), and preempts or cancels it with SIGTERM. Three components could react:

- Lightning's `SLURMEnvironment(auto_requeue=True)` saves its checkpoint *inside the signal
  handler*, i.e. wherever the main thread happens to be, possibly between backward and the
  optimizer step, so the resumed run can differ from an uninterrupted one;
- submitit's USR2 handler requeues the whole Hydra job without saving anything of the fit;
- `PreemptionHandler`'s handler only records the signal. The training loop acts at the next batch
  end (or validation end), a point Lightning's loops resume from exactly: every rank saves
  `<default_root_dir>/last.ckpt`, rank 0 requeues the Slurm job, and the fit stops by raising
  `Preempted`, so the phase is not marked done.

The other two are switched off: the runner builds its trainers with
`SLURMEnvironment(auto_requeue=False)`, and the Slurm launcher and slurm/array.sbatch ask Slurm for
USR1, so nothing sends submitit's USR2.

SIGTERM requeues only while Slurm still reports the job RUNNING: that is preemption, whose grace
time the job used to checkpoint (a preempted job that exits by itself is not requeued by Slurm,
even with PreemptMode=REQUEUE). `scancel` marks the job COMPLETING before signalling it, and a
cancelled job must stay cancelled (`scontrol requeue` would revive it).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn

from dynlab.checkpointing import LAST

log = logging.getLogger(__name__)

# SIGUSR1: Slurm's warning before the time limit (sbatch --signal=USR1@N).
# SIGTERM: preemption (after which GraceTime seconds are left) or scancel.
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(SystemExit):
    """A fit stopped on a signal after saving its checkpoint; rerunning the job resumes from it.

    A `SystemExit`, so that `except Exception` on the way out (Hydra's job runner, submitit's job
    wrapper) lets it pass: a requeued job must end without reporting a result.
    """


class PreemptionHandler(pl.Callback):
    """Checkpoints and stops training at the first safe point after SIGUSR1 or SIGTERM.

    Its handlers are installed for the training loop only (on_train_start, after Lightning sets
    its own, until on_train_end or on_exception). Put it after callbacks whose state changes at
    batch end (dynlab.data.sampling.ResumableLoaderCallback): Lightning calls them in list order
    and this one saves the state they leave.
    """

    def __init__(self) -> None:
        self._received: set[signal.Signals] = set()
        self._previous: dict[signal.Signals, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._received.clear()
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._stop_if_signalled(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._stop_if_signalled(trainer)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._received.add(signal.Signals(signum))

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _stop_if_signalled(self, trainer: pl.Trainer) -> None:
        # Any rank's signal stops all ranks at the same step (the checkpoint save is collective).
        if not trainer.strategy.reduce_boolean_decision(bool(self._received), all=False):
            return
        time_limit = signal.SIGUSR1 in self._received
        time_limit = trainer.strategy.reduce_boolean_decision(time_limit, all=False)
        path = Path(trainer.default_root_dir) / LAST
        trainer.save_checkpoint(path)
        message = (
            f"stopped at epoch {trainer.current_epoch}, step {trainer.global_step}; "
            f"checkpoint {path}"
        )
        job = slurm_job_id(os.environ)
        if job is not None and trainer.is_global_zero:
            if time_limit or slurm_job_state(job) == "RUNNING":
                message += "; " + requeue(job)
            else:
                message += f"; Slurm job {job} is being cancelled, not requeued"
        log.warning(message)
        raise Preempted(f"[dynlab] preempted: {message}")


def slurm_job_id(environ: Mapping[str, str]) -> str | None:
    """The id `scontrol requeue` needs: `<array job>_<task>` for an array task (the array's own
    id would requeue every task), the job id otherwise, None outside Slurm."""
    if "SLURM_ARRAY_JOB_ID" in environ and "SLURM_ARRAY_TASK_ID" in environ:
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


def slurm_job_state(job: str) -> str:
    """The job's state as squeue reports it (RUNNING, COMPLETING, ...), '' if Slurm does not answer."""
    try:
        result = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip()


def requeue(job: str) -> str:
    """Ask Slurm to requeue `job` (it ends this run); returns what happened, for the log."""
    try:
        result = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"requeueing Slurm job {job} failed ({err}); resubmit it to resume"
    if result.returncode != 0:
        return f"requeueing Slurm job {job} failed ({result.stderr.strip()}); resubmit it to resume"
    return f"requeued Slurm job {job}"
