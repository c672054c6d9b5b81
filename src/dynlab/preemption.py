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

Custom phases (a search) and the gaps between phases are covered too: the runner holds
`job_signals()` around the schedule, so a signal arriving outside a fit is recorded instead of
killing the job, and is acted on at the next safe point: the next candidate boundary of a search
(`stop_if_signalled`, after its ledger is saved), the next batch end of a fit, or the end of the
schedule. The signals received are shared by all of these (module state: one job per process).

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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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


_received: set[signal.Signals] = set()  # signals not acted on yet, for the whole job


def _record(signum: int, frame: FrameType | None) -> None:
    _received.add(signal.Signals(signum))


@contextmanager
def recording_signals() -> Iterator[None]:
    """Record SIGUSR1/SIGTERM (instead of dying) while inside; the previous handlers come back."""
    previous = {signum: signal.signal(signum, _record) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def signalled() -> bool:
    """Whether this process received a signal not acted on yet."""
    return bool(_received)


@contextmanager
def job_signals(reduce: Callable[[bool], bool] | None = None) -> Iterator[None]:
    """A job's schedule: signals are recorded from here on, and one still pending at the end (it
    arrived after the last safe point) stops the job there, before the final evaluation."""
    _received.clear()
    with recording_signals():
        yield
        stop_if_signalled("after the last phase", reduce=reduce)


def stop_if_signalled(
    where: str,
    reduce: Callable[[bool], bool] | None = None,
    is_global_zero: bool | None = None,
) -> None:
    """At a safe point whose state is saved: if any rank got a signal, requeue (rank 0) and raise
    `Preempted` on every rank. `reduce(flag)` ORs a flag over the ranks (collective)."""
    reduce = reduce or _any_rank
    if not reduce(bool(_received)):
        return
    time_limit = reduce(signal.SIGUSR1 in _received)
    if is_global_zero is None:
        is_global_zero = _rank() == 0
    message = f"stopped {where}"
    job = slurm_job_id(os.environ)
    if job is not None and is_global_zero:
        if time_limit or slurm_job_state(job) == "RUNNING":
            message += "; " + requeue(job)
        else:
            message += f"; Slurm job {job} is being cancelled, not requeued"
    _received.clear()
    log.warning(message)
    raise Preempted(f"[dynlab] preempted: {message}")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _any_rank(flag: bool) -> bool:
    """`flag` ORed over the ranks of an initialised process group (itself outside one)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class SignalRecorder(pl.Callback):
    """Records SIGUSR1/SIGTERM during a training loop instead of letting Lightning's handlers act
    (installed at on_train_start, after Lightning sets its own, until on_train_end or
    on_exception). Alone, it keeps a search candidate's fit running to the next candidate
    boundary; `PreemptionHandler` adds the checkpoint-and-stop at batch ends."""

    def __init__(self) -> None:
        self._scope: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._scope = recording_signals()
        self._scope.__enter__()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._scope is not None:
            self._scope.__exit__(None, None, None)
            self._scope = None


class PreemptionHandler(SignalRecorder):
    """Checkpoints and stops training at the first safe point after SIGUSR1 or SIGTERM.

    A signal recorded before the fit (between phases, under `job_signals`) stops it at its first
    batch end. Put it after callbacks whose state changes at batch end
    (dynlab.data.sampling.ResumableLoaderCallback): Lightning calls them in list order and this
    one saves the state they leave.
    """

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

    def _stop_if_signalled(self, trainer: pl.Trainer) -> None:
        # Any rank's signal stops all ranks at the same step (the checkpoint save is collective).
        reduce = trainer.strategy.reduce_boolean_decision
        if not reduce(bool(_received), all=False):
            return
        path = Path(trainer.default_root_dir) / LAST
        trainer.save_checkpoint(path)
        stop_if_signalled(
            f"at epoch {trainer.current_epoch}, step {trainer.global_step}; checkpoint {path}",
            reduce=lambda flag: reduce(flag, all=False),
            is_global_zero=trainer.is_global_zero,
        )


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
