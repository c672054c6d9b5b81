"""Candidates of one search step as one Slurm job array (submitit), results back in the ledger.

The alternative to `ranks` (candidates spread over the ranks of one job): here the controller
(one process) submits the step's candidates as ONE job array, task i evaluating candidate i, waits
for every task and adds the records to its `Ledger` as they arrive, saved each time.

- Settings: from the run's Hydra launcher config when the run was launched with
  `hydra/launcher=slurm` (hydra-submitit-launcher's `SlurmLauncher`): partition, timeout_min,
  cpus_per_task, mem_gb, setup, additional_parameters, ... as the controller's own job got them,
  except the shape: one node, one task, `gpus_per_task` GPUs (one candidate per task, whatever
  the controller's devices). submitit's files and the tasks' logs go to `<phase dir>/.submitit`.
- What a task runs: the callable is pickled once per step (`<folder>/shared_*.pkl`, removed when
  the step is complete); each task loads it and calls it with its candidate's index.
- Preemption: tasks are submitted with `--requeue`, so a preempted task is requeued by Slurm and
  simply runs again (candidates are seeded by index: the same record); the controller keeps
  waiting. The launcher's `--signal=USR1` line (dynlab's fit checkpointing) is not passed on: a
  task has no checkpoint to save; its time-limit warning is submitit's USR2, whose handler gives
  up on a timed-out task (no result: resubmitted as below).
- A task that ended without a result (killed, node failure, out of memory, time limit, requeue
  refused) is resubmitted, at most `retries` times, as a new array of such tasks; an exception in
  the candidate code is raised in the controller as `CandidateFailed`, with the task's log.
- A killed controller resumes where it stopped: the job ids of the tasks in flight are kept in
  the ledger's state (`ARRAY_JOBS`), and the resumed search waits for those still queued or
  running, or takes the results of those that finished meanwhile, instead of submitting again.

Job states come from `squeue` (a cluster without accounting has no `sacct`, which submitit's own
watcher needs to notice a dead job).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle

from dynlab.data.sampling import rank_and_world_size
from dynlab.preemption import stop_if_signalled
from dynlab.search.ledger import Ledger

log = logging.getLogger(__name__)

__all__ = [
    "ARRAY_JOBS",
    "ArrayConfig",
    "CandidateFailed",
    "evaluate_array",
    "hydra_slurm_launcher",
    "map_array",
]

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
ARRAY_JOBS = "array_jobs"  # the ledger state's {candidate index: [Slurm job id, shared pickle]}
# Launcher keys that do not carry over to a candidate's task: the shape (one task, one node, the
# GPUs a candidate needs), submitit's folder and resubmission count, and the plugin's own fields.
_NOT_CARRIED = {
    "_target_",
    "submitit_folder",
    "nodes",
    "tasks_per_node",
    "gpus_per_node",
    "max_num_timeout",
}
# submitit's AutoExecutor takes BaseQueueConf's keys as they are and the others with "slurm_".
_BASE_KEYS = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb"}
_BASE_KEYS |= {"nodes", "name", "stderr_to_stdout"}
# Slurm states after which a task will not run again by itself (PREEMPTED is followed by a
# requeue when the job may requeue: the grace time covers that gap).
_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL"}
_ENDED |= {"OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT"}


class CandidateFailed(RuntimeError):
    """A candidate's code raised in its array task (not retried: it would raise again)."""


@dataclass(frozen=True)
class ArrayConfig:
    """Where and how a step's candidates run as a Slurm job array.

    `parameters` go to `submitit.AutoExecutor.update_parameters` (`timeout_min`, `mem_gb`,
    `slurm_partition`, `slurm_setup`, `slurm_additional_parameters`, ...).
    """

    folder: Path
    parameters: Mapping[str, Any] = field(default_factory=dict)
    retries: int = 2  # resubmissions of a task that ended without a result
    poll_s: float = 5.0  # how often Slurm is asked about the tasks
    grace_s: float = 30.0  # how long an ended task's result may take to appear (shared disks)

    @classmethod
    def from_launcher(
        cls, launcher: Mapping[str, Any], folder: str | Path, gpus_per_task: int = 0, **kwargs: Any
    ) -> ArrayConfig:
        """From hydra-submitit-launcher's Slurm settings (`hydra.launcher`), one task per
        candidate with `gpus_per_task` GPUs; `kwargs` set the other fields (retries, ...)."""
        parameters: dict[str, Any] = {"nodes": 1, "tasks_per_node": 1}
        if gpus_per_task:
            parameters["gpus_per_node"] = gpus_per_task
        for key in launcher:
            if key in _NOT_CARRIED:
                continue
            if key == "additional_parameters":
                # dynlab's USR1 is for fits (checkpoint and requeue); a task's warning is
                # submitit's USR2, and Slurm requeues a preempted task (`requeue` stays).
                extra = launcher[key] or {}
                value = {k: _resolved(extra, k) for k in extra if k != "signal"}
            else:
                value = _resolved(launcher, key)
            if key == "name":
                value = f"{value}-candidates"
            if value is not None:
                parameters[key if key in _BASE_KEYS else f"slurm_{key}"] = value
        return cls(Path(folder), parameters, **kwargs)

    @classmethod
    def from_hydra(cls, folder: str | Path, gpus_per_task: int = 0, **kwargs: Any) -> ArrayConfig:
        """From the run's launcher config (`from_launcher`), defaults outside a Slurm launch."""
        launcher = hydra_slurm_launcher()
        if launcher is None:  # submitit's defaults, with the time limit of conf's launcher
            parameters = {"nodes": 1, "tasks_per_node": 1, "timeout_min": 60}
            if gpus_per_task:
                parameters["gpus_per_node"] = gpus_per_task
            return cls(Path(folder), parameters, **kwargs)
        return cls.from_launcher(launcher, folder, gpus_per_task, **kwargs)


def _resolved(node: Mapping[str, Any], key: str) -> Any:
    """`node[key]` as plain Python, interpolations resolved (None where one cannot be)."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        value = node[key]
        if isinstance(node, DictConfig) and OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
        return value
    except OmegaConfBaseException as err:
        log.warning("array settings: hydra.launcher.%s is left out (%s)", key, err)
        return None


def hydra_slurm_launcher() -> Mapping[str, Any] | None:
    """The run's `hydra.launcher` config when it was launched with submitit's Slurm launcher
    (`hydra/launcher=slurm`), else None (no Hydra run, another launcher)."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover - Hydra is a dependency
        return None
    if not HydraConfig.initialized():
        return None
    launcher = HydraConfig.get().get("launcher")
    if launcher is None or launcher.get("_target_") != SLURM_LAUNCHER:
        return None
    return launcher


@dataclass(frozen=True)
class _Shared:
    """An array task: the step's callable (pickled once, at `path`) applied to one key."""

    path: str

    def __call__(self, key: int) -> Any:
        with open(self.path, "rb") as f:
            fn = cloudpickle.load(f)
        return fn(key)


@contextmanager
def _submission_env() -> Iterator[None]:
    """submitit.helpers.clean_env without dropping SLURM_CONF: a controller running as a Slurm
    job (DDP ranks, tasks per node, memory) must not pass its allocation on to the array."""
    distributed = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    distributed |= {"LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "NODE_RANK"}
    prefixes = ("SLURM_", "SLURMD_", "SRUN_", "SBATCH_", "SUBMITIT_")
    hidden = {
        name: os.environ.pop(name)
        for name in list(os.environ)
        if (name.startswith(prefixes) and name != "SLURM_CONF") or name in distributed
    }
    try:
        yield
    finally:
        os.environ.update(hidden)


def _submit(config: ArrayConfig, shared: Path, keys: Sequence[int]) -> list[Any]:
    """Submit `keys` as one job array; their submitit jobs, in order."""
    import submitit

    executor = submitit.AutoExecutor(
        folder=config.folder / "%j", cluster="slurm", slurm_max_num_timeout=0
    )
    executor.update_parameters(**config.parameters)
    with _submission_env():
        jobs = executor.map_array(_Shared(str(shared)), list(keys))
    log.info(
        "candidates %s: Slurm job array %s (%s)",
        ", ".join(map(str, keys)),
        jobs[0].job_id.split("_")[0],
        config.folder,
    )
    return jobs


def _job(config: ArrayConfig, job_id: str) -> Any:
    import submitit

    return submitit.SlurmJob(folder=config.folder / "%j", job_id=job_id)


def queue_states(job_ids: Sequence[str]) -> dict[str, str] | None:
    """squeue's state of every task still known to Slurm among `job_ids` (`<array>_<task>`);
    a task missing from the answer has left the queue. None when Slurm does not answer."""
    states: dict[str, str] = {}
    for array in sorted({job.split("_")[0] for job in job_ids}):
        try:
            result = subprocess.run(
                ["squeue", "-h", "-r", "-t", "all", "-j", array, "-o", "%i|%T"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if result.returncode != 0:
            if "invalid job id" in result.stderr.lower():
                continue  # purged: every task of it has ended
            return None
        for line in result.stdout.split():
            job, _, state = line.partition("|")
            states[job] = state
    return states


def _outcome(job: Any) -> tuple[str, Any]:
    """From a task's result file: ("ok", result), ("error", trace) when the code raised, or
    ("lost", why) when submitit itself gave up inside the task (timed out, not checkpointable)."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        return "ok", job.result()
    except FailedJobError as err:  # (a subclass of UncompletedJobError)
        if "UncompletedJobError" in str(err):
            return "lost", str(err)
        return "error", str(err)
    except UncompletedJobError as err:
        return "lost", str(err)


def _log_tail(job: Any, lines: int = 40) -> str:
    for path in (job.paths.stderr, job.paths.stdout):
        if path.exists():
            return f"{path}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return f"no log at {job.paths.stderr}"


def map_array(
    fn: Callable[[int], Any],
    keys: Sequence[int],
    config: ArrayConfig,
    jobs: MutableMapping[int, list[str]] | None = None,
    on_change: Callable[[], None] | None = None,
    on_result: Callable[[int, Any, str], None] | None = None,
    on_wait: Callable[[], None] | None = None,
) -> dict[int, Any]:
    """`fn(key)` for every key, as one Slurm job array (task i: `keys[i]`); the results by key.

    `jobs` maps a key to its task in flight ([job id, shared pickle]); it is updated as tasks are
    submitted and finish, and keys already in it are waited for rather than submitted again (a
    caller persists it: `on_change()` runs after each submission or failure, and
    `on_result(key, result, job id)` as each result arrives). `on_wait()` runs between polls (it may raise to stop waiting: the
    tasks keep running). Tasks that end without a result are resubmitted up to
    `config.retries` times; `CandidateFailed` carries an exception raised by `fn`.
    """
    jobs = {} if jobs is None else jobs
    config.folder.mkdir(parents=True, exist_ok=True)
    shared = config.folder / f"shared_{uuid.uuid4().hex[:12]}.pkl"
    with open(shared, "wb") as f:
        cloudpickle.dump(fn, f)
    pending: dict[int, Any] = {}
    for key in keys:
        if key in jobs:  # in flight when a previous controller stopped
            pending[key] = _job(config, jobs[key][0])
    attempts = dict.fromkeys(keys, 0)

    def submit(todo: list[int]) -> None:
        for key, job in zip(todo, _submit(config, shared, todo), strict=True):
            pending[key], jobs[key] = job, [job.job_id, str(shared)]
            attempts[key] += 1
        if on_change is not None:
            on_change()

    fresh = [key for key in keys if key not in pending]
    if fresh:
        submit(fresh)
    results: dict[int, Any] = {}
    ended_since: dict[int, float] = {}
    last_poll = float("-inf")
    while pending:
        lost: list[int] = []
        states = None
        if time.monotonic() - last_poll >= config.poll_s:
            states, last_poll = (
                queue_states([job.job_id for job in pending.values()]),
                time.monotonic(),
            )
        for key, job in list(pending.items()):
            if job.paths.result_pickle.exists():
                kind, value = _outcome(job)
            else:
                if states is None:
                    continue
                state = states.get(job.job_id, "GONE").split()[0]
                if state not in _ENDED and state != "GONE":
                    ended_since.pop(key, None)  # queued, running, or requeued by Slurm
                    continue
                since = ended_since.setdefault(key, time.monotonic())
                if time.monotonic() - since < config.grace_s:
                    continue
                kind, value = "lost", f"state {state}, no result; {_log_tail(job)}"
            ended_since.pop(key, None)
            if kind == "error":
                jobs.pop(key, None)  # a resumed search runs it again (the code may be fixed)
                if on_change is not None:
                    on_change()
                raise CandidateFailed(
                    f"candidate {key} raised in Slurm task {job.job_id} "
                    f"(log {job.paths.stderr}):\n{value}"
                )
            del pending[key]
            if kind == "lost":
                log.warning("candidate %s: Slurm task %s left no result", key, job.job_id)
                if attempts[key] > config.retries:
                    raise RuntimeError(
                        f"candidate {key}: Slurm task {job.job_id} ended without a result "
                        f"after {attempts[key]} submissions (log {job.paths.stderr}):\n{value}"
                    )
                _cancel(job.job_id)  # should it still be queued somehow, it must not run twice
                lost.append(key)
                continue
            results[key] = value
            jobs.pop(key, None)
            if on_result is not None:
                on_result(key, value, job.job_id)
        if lost:
            submit(lost)
        if pending:
            if on_wait is not None:
                on_wait()
            time.sleep(min(1.0, config.poll_s))
    _remove_unused(config.folder, jobs)
    return results


def _cancel(job_id: str) -> None:
    with suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60)


def _remove_unused(folder: Path, jobs: Mapping[int, list[str]]) -> None:
    """Delete the shared pickles no task in flight needs any more."""
    needed = {Path(shared) for _, shared in jobs.values()}
    for path in folder.glob("shared_*.pkl"):
        if path not in needed:
            path.unlink(missing_ok=True)


def evaluate_array(
    todo: Sequence[int],
    evaluate: Callable[[int], dict[str, Any]],
    ledger: Ledger,
    config: ArrayConfig,
) -> None:
    """Evaluate candidates `todo` (indices) as one Slurm job array, adding each record (with its
    `index` and the `slurm_job` that ran it) to `ledger` as it arrives, saved each time.

    The counterpart of `ranks.evaluate_spread` for a one-process controller: the tasks in flight
    are kept in `ledger.state[ARRAY_JOBS]` so a resumed search waits for them. A Slurm signal to the controller stops it between polls
    (`Preempted`, after the ledger is saved); the tasks keep running.
    """
    if rank_and_world_size()[1] != 1:
        raise ValueError("a search's job array is submitted by a one-process controller")
    jobs: dict[int, list[str]] = ledger.state.setdefault(ARRAY_JOBS, {})
    for key in [k for k in jobs if k not in todo]:
        del jobs[key]  # evaluated already
    if not todo:
        return

    def arrived(key: int, record: dict[str, Any], job_id: str) -> None:
        ledger.add([{**record, "index": key, "slurm_job": job_id}])
        ledger.save()

    def waiting() -> None:
        stop_if_signalled(f"waiting for candidates {list(jobs)}; ledger {ledger.path}")

    map_array(
        evaluate, todo, config, jobs, on_change=ledger.save, on_result=arrived, on_wait=waiting
    )
