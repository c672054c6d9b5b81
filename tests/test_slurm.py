"""The Slurm path. Without a cluster: dynlab-sweep-file. On a real one-node cluster
(slurm/local-cluster.sh, tests marked `slurm`): the Hydra Slurm launcher, slurm/array.sbatch, jobs
interrupted before their time limit or preempted that requeue themselves and end on the weights of
an uninterrupted run, and dynlab-report over the results.

Jobs are tiny but a loaded 2-core machine makes each take a minute: everything polls with
generous timeouts, and a failure prints the jobs' and the daemons' logs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from dynlab.apps.sweep_file import expand, sweep_line
from dynlab.apps.sweep_file import main as sweep_file_main

from .conftest import S2D_SEARCH, run_cli

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local-cluster.sh"
CLUSTER_DIR = Path(os.environ.get("DYNLAB_SLURM_DIR", "/tmp/dynlab-slurm"))
TINY = [
    "technique=baseline",
    "dataset=synthetic",
    "dataset.num_train=96",
    "dataset.num_test=64",
    "dataset.val_size=32",
    "dataset.batch_size=32",
    "backbone=cifar_resnet20",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]
# Long enough to be interrupted mid-training: 6 epochs of 8 batches (288 - 32 held out, by 32).
LONGER = [
    "technique=baseline",
    "dataset=synthetic",
    "dataset.num_train=288",
    "dataset.num_test=64",
    "dataset.val_size=32",
    "dataset.batch_size=32",
    "backbone=cifar_resnet20",
    "trainer.max_epochs=6",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "seed=0",
]
JOB_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """Start the local cluster (installing Slurm if needed); the environment jobs are submitted from.

    Skips only where Slurm cannot be installed. Stops the cluster afterwards if it started it.
    """
    was_up = subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
    start = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=900)
    if start.returncode == 3:
        pytest.skip(f"Slurm is not installed and cannot be installed here: {start.stderr.strip()}")
    assert start.returncode == 0, f"local-cluster.sh start failed:\n{start.stdout}\n{start.stderr}"
    conf = re.search(r"export SLURM_CONF=(\S+)", start.stdout)
    assert conf, start.stdout
    yield {
        **os.environ,
        "SLURM_CONF": conf.group(1),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "DYNLAB_PYTHON": sys.executable,
    }
    if not was_up:
        subprocess.run([CLUSTER, "stop"], capture_output=True, timeout=120)


@pytest.fixture
def cluster(slurm_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The cluster's environment for one test; afterwards, jobs a failure left queued (they would
    hold the CPUs) are cancelled."""
    yield slurm_env
    jobs = slurm(slurm_env, "squeue", "-h", "-o", "%A").split()
    if jobs:
        slurm(slurm_env, "scancel", *jobs)


def slurm(env: dict[str, str], *args: str) -> str:
    """Run a Slurm client command and return its stdout."""
    return subprocess.run(
        args, env=env, capture_output=True, text=True, check=True, timeout=60
    ).stdout


def logs(*folders: Path) -> str:
    """The jobs' logs under `folders` and the tail of the daemons' logs, for failure messages."""
    parts = []
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.suffix in (".out", ".err", ".log") and path.is_file():
                parts.append(f"==> {path} <==\n{path.read_text(errors='replace')[-3000:]}")
    for path in sorted((CLUSTER_DIR / "log").glob("slurm*.log")):
        parts.append(
            f"==> {path} <==\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:])
        )
    return "\n".join(parts)


def wait_until(
    condition: Callable[[], bool], what: str, diagnostics: Callable[[], str], every: float = 2.0
) -> None:
    """Poll `condition` every `every` seconds until it holds or JOB_TIMEOUT_S passes."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{diagnostics()}")
        time.sleep(every)


def job_done(env: dict[str, str], job: str) -> bool:
    return slurm(env, "squeue", "-h", "-j", job, "-o", "%T").strip() == ""


def results(run_dir: Path) -> dict:
    path = run_dir / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def assert_completed(run_dirs: list[Path], diagnostics: Callable[[], str]) -> None:
    for run_dir in run_dirs:
        status = results(run_dir).get("status")
        assert status == "completed", f"{run_dir}: status {status}\n{diagnostics()}"


def dynlab(app: str, *args: str, env: dict[str, str], cwd: Path, timeout: float) -> str:
    """Run a dynlab app as a user would; returns stdout, fails with its output on error."""
    return run_cli(app, list(args), cwd=cwd, timeout=timeout, env=env).stdout


def slurm_multirun(sweep: Path, *overrides: str, cluster: dict[str, str], cwd: Path) -> None:
    """`dynlab-train -m hydra/launcher=slurm ...` into `sweep`, waiting for the whole array."""
    dynlab(
        "train",
        "-m",
        "hydra/launcher=slurm",
        f"hydra.sweep.dir={sweep}",
        *TINY,
        *overrides,
        env=cluster,
        cwd=cwd,
        timeout=JOB_TIMEOUT_S,
    )


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / "train" / "final.ckpt"
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_sweep_file_jobs_are_hydra_multirun_jobs_in_order() -> None:
    overrides = [
        "backbone=cifar_resnet20,cifar_resnet56",
        "trainer.max_epochs=2",
        "seed=range(0,2)",
    ]
    parsed = OverridesParser.create().parse_overrides(overrides)
    (hydra_jobs,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    assert expand(overrides) == hydra_jobs
    assert len(hydra_jobs) == 4


def test_sweep_file_lines_read_back_as_the_same_overrides() -> None:
    job = ["logger.tags=[a,b]", "+note='two words'", "seed=1"]
    assert shlex.split(sweep_line(job)) == job


def test_sweep_file_rejects_sweeps_it_cannot_enumerate() -> None:
    with pytest.raises(ValueError, match="interval"):
        expand(["technique.optim.lr=interval(0.01,0.1)"])


def test_sweep_file_cli_writes_lines_and_the_sbatch_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep_file, runs = tmp_path / "sweep.txt", tmp_path / "runs"
    sweep_file_main([*TINY, "seed=0,1,2", "-o", str(sweep_file), "--sweep-dir", str(runs)])

    lines = sweep_file.read_text().splitlines()
    assert [line.split()[-1] for line in lines] == ["seed=0", "seed=1", "seed=2"]
    assert runs.is_dir()  # sbatch needs the --output folder to exist
    command = shlex.split(capsys.readouterr().out.splitlines()[-1])
    assert command == [
        "sbatch",
        "--array=0-2",
        f"--output={runs}/slurm-%A_%a.out",
        "slurm/array.sbatch",
        str(sweep_file),
        str(runs),
    ]


def test_sweep_file_cli_rejects_a_config_typo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        sweep_file_main(["trainer.max_epoch=3", "seed=0,1", "-o", str(tmp_path / "s.txt")])
    assert exit_info.value.code == 2
    assert "job 0 (trainer.max_epoch=3 seed=0)" in capsys.readouterr().err
    assert not (tmp_path / "s.txt").exists()


def assert_report_of_two_runs(path: Path, tmp_path: Path, cluster: dict[str, str]) -> None:
    """dynlab-report over a finished 2-job sweep finds both runs and draws the figure."""
    report = dynlab(
        "report", str(path), "-o", str(tmp_path / "report"), env=cluster, cwd=tmp_path, timeout=120
    )
    assert "2 of 2 runs completed" in report
    assert (tmp_path / "report" / "accuracy_vs_macs.png").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_hydra_multirun_becomes_one_slurm_array(cluster: dict[str, str], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    slurm_multirun(
        sweep, "hydra.launcher.timeout_min=30", "seed=0,1", cluster=cluster, cwd=tmp_path
    )

    run_dirs = sorted(p.parent for p in sweep.glob("*/.hydra"))
    assert [p.name[:2] for p in run_dirs] == ["0_", "1_"]
    assert_completed(run_dirs, lambda: logs(sweep / ".submitit"))
    assert [results(p)["config"]["seed"] for p in run_dirs] == [0, 1]
    # One array of two tasks, whose script asks for USR1 (not submitit's USR2) and may requeue.
    (script,) = (sweep / ".submitit").glob(".submission_file_*.sh")
    sbatch_lines = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --array=0-1%2" in sbatch_lines
    assert [line for line in sbatch_lines if "--signal" in line] == ["#SBATCH --signal=USR1@120"]
    assert "#SBATCH --requeue" in sbatch_lines
    assert "#SBATCH --ntasks-per-node=1" in sbatch_lines  # = trainer.devices

    assert_report_of_two_runs(sweep, tmp_path, cluster)


@pytest.mark.slurm
@pytest.mark.slow
def test_ddp_job_runs_one_slurm_task_per_device(cluster: dict[str, str], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    slurm_multirun(sweep, "trainer=ddp_cpu", cluster=cluster, cwd=tmp_path)  # 2 gloo processes

    (run_dir,) = [p.parent for p in sweep.glob("*/.hydra")]
    submitit = sweep / ".submitit"
    assert_completed([run_dir], lambda: logs(submitit))
    (script,) = submitit.glob("*/*_submission.sh")
    assert "#SBATCH --ntasks-per-node=2" in script.read_text().splitlines()
    # Lightning took the ranks from Slurm (srun started both processes); its info lines go to the
    # run's log file, not to the console.
    rank_logs = "".join(
        p.read_text() for p in [*submitit.glob("*/*_log.err"), *run_dir.glob("*.log")]
    )
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in rank_logs and "GLOBAL_RANK: 1, MEMBER: 2/2" in rank_logs


@pytest.mark.slurm
@pytest.mark.slow
def test_array_sbatch_runs_one_job_per_sweep_file_line(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    sweep_file, runs = tmp_path / "sweep.txt", tmp_path / "runs"
    printed = dynlab(
        "sweep_file",
        *TINY,
        "seed=0,1",
        "-o",
        str(sweep_file),
        "--sweep-dir",
        str(runs),
        env=cluster,
        cwd=tmp_path,
        timeout=120,
    )
    assert len(sweep_file.read_text().splitlines()) == 2
    command = shlex.split(printed.splitlines()[-1])
    assert command[:2] == ["sbatch", "--array=0-1"]

    submitted = subprocess.run(
        command, env=cluster, cwd=REPO, capture_output=True, text=True, check=True
    )
    job = submitted.stdout.split()[-1]
    wait_until(lambda: job_done(cluster, job), f"array job {job}", lambda: logs(runs))

    assert_completed([runs / "0", runs / "1"], lambda: logs(runs))
    assert [results(runs / str(i))["config"]["seed"] for i in (0, 1)] == [0, 1]
    assert_report_of_two_runs(runs, tmp_path, cluster)


@pytest.fixture(scope="module")
def uninterrupted(
    slurm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], Path]]:
    """A local, never interrupted run of LONGER, started in the background; waited for on use."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    log = run_dir.parent / "train.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dynlab.apps.train", *LONGER, f"hydra.run.dir={run_dir}"],
            env=slurm_env,
            cwd=run_dir.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def finished() -> Path:
        assert proc.wait(timeout=JOB_TIMEOUT_S) == 0, (
            f"uninterrupted run failed:\n{log.read_text()[-6000:]}"
        )
        return run_dir

    yield finished
    proc.kill()


def time_limit_warning(env: dict[str, str], task: str) -> None:
    """What Slurm sends `signal_delay_s` before the time limit: SIGUSR1 to the job steps (srun's
    tasks, the training processes; `--batch` would signal the batch shell instead)."""
    slurm(env, "scancel", "--signal=USR1", task)


def preemption(env: dict[str, str], task: str) -> None:
    """A whole-node job in the `urgent` partition: Slurm preempts `task`, which gets SIGTERM and
    the debug partition's GraceTime to checkpoint."""
    cpus = slurm(env, "sinfo", "-h", "-o", "%c").split()[0]
    slurm(
        env,
        "sbatch",
        "--partition=urgent",
        f"--cpus-per-task={cpus}",
        "--output=/dev/null",
        "--wrap=true",
    )


def interrupt_and_release(
    env: dict[str, str],
    task: str,
    run_dir: Path,
    job_logs: Path,
    interrupt: Callable[[dict[str, str], str], None] = time_limit_warning,
) -> None:
    """After the first epoch of `task` (its checkpoint exists), `interrupt` it, wait until the job
    has requeued itself, and lift Slurm's ~2 minute hold on the requeued job."""
    first_epoch = run_dir / "checkpoints" / "train" / "last.ckpt"
    wait_until(first_epoch.exists, f"the first epoch of {task}", lambda: logs(job_logs), every=0.2)
    interrupt(env, task)

    def requeued() -> bool:
        info = slurm(env, "scontrol", "show", "job", task)
        if re.search(r"JobState=(COMPLETED|FAILED|CANCELLED)", info):
            pytest.fail(f"{task} ended instead of requeueing itself\n{logs(job_logs)}")
        return "Restarts=1" in info and "JobState=PENDING" in info

    wait_until(requeued, f"{task} to requeue itself", lambda: logs(job_logs))
    slurm(env, "scontrol", "update", f"jobid={task}", "starttime=now")


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    assert results(resumed)["metrics"] == results(uninterrupted)["metrics"]
    resumed_weights, reference = final_weights(resumed), final_weights(uninterrupted)
    assert resumed_weights.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(resumed_weights[name], value), name


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("interrupt", [time_limit_warning, preemption], ids=lambda f: f.__name__)
def test_interrupted_array_task_requeues_and_ends_like_an_uninterrupted_run(
    cluster: dict[str, str],
    uninterrupted: Callable[[], Path],
    tmp_path: Path,
    interrupt: Callable[[dict[str, str], str], None],
) -> None:
    sweep_file, runs = tmp_path / "sweep.txt", tmp_path / "runs"
    sweep_file.write_text(" ".join(LONGER) + "\n")
    runs.mkdir()
    cpus = slurm(cluster, "sinfo", "-h", "-o", "%c").split()[0]
    submitted = slurm(
        cluster,
        "sbatch",
        "--parsable",
        "--array=0-0",
        f"--cpus-per-task={cpus}",  # the whole node: an urgent job can only run by preempting it
        f"--output={runs / 'slurm-%A_%a.out'}",
        str(REPO / "slurm" / "array.sbatch"),
        str(sweep_file),
        str(runs),
    )
    task = f"{submitted.strip()}_0"
    interrupt_and_release(cluster, task, runs / "0", runs, interrupt)
    wait_until(lambda: job_done(cluster, task), f"{task} to finish", lambda: logs(runs))

    log = next(runs.glob("slurm-*.out")).read_text()
    stopped = re.search(r"stopped at epoch \d+, step (\d+).*requeued Slurm job", log)
    assert stopped and 8 < int(stopped.group(1)) < 48, logs(runs)  # mid-training, not at its ends
    assert ", restart 1)" in log, log  # array.sbatch's banner of the requeued run
    assert_completed([runs / "0"], lambda: logs(runs))
    assert_same_run(runs / "0", uninterrupted())


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_multirun_job_finishes_before_the_sweep_returns(
    cluster: dict[str, str], uninterrupted: Callable[[], Path], tmp_path: Path
) -> None:
    sweep, master_log = tmp_path / "sweep", tmp_path / "master.log"
    with open(master_log, "w") as out:
        master = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dynlab.apps.train",
                "-m",
                "hydra/launcher=slurm",
                f"hydra.sweep.dir={sweep}",
                "hydra.launcher.timeout_min=30",
                *LONGER,
            ],
            env=cluster,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    submitit = sweep / ".submitit"

    def first_epoch_done() -> bool:
        if master.poll() is not None:
            pytest.fail(f"dynlab-train -m exited early:\n{master_log.read_text()[-6000:]}")
        return any(sweep.glob("0_*/checkpoints/train/last.ckpt"))

    wait_until(
        first_epoch_done,
        "the first epoch of the sweep's job",
        lambda: master_log.read_text()[-3000:] + logs(submitit),
        every=0.2,
    )
    (task,) = [p.name for p in submitit.iterdir() if p.is_dir()]  # a one-job sweep: a plain job
    run_dir = next(sweep.glob("0_*"))
    interrupt_and_release(cluster, task, run_dir, submitit)

    assert master.wait(timeout=JOB_TIMEOUT_S) == 0, master_log.read_text()[-6000:]
    # The launcher waited for the requeued job (a preempted job must end without a result).
    assert_completed(
        [run_dir], lambda: "the sweep returned before its requeued job finished\n" + logs(submitit)
    )
    assert_same_run(run_dir, uninterrupted())


# An S2DNAS search of 6 candidates (3 controller updates of 2), then one short retrain.
SEARCH = [
    *S2D_SEARCH,
    "technique.search.iterations=3",
    "technique.search.candidate_batches=2",
    "technique.search.top_k=1",
    "technique.search.retrain_epochs=1",
    "dataset.batch_size=16",
    "logger=csv",
    "seed=0",
]


@pytest.mark.slurm
@pytest.mark.slow
def test_search_signalled_mid_search_requeues_and_continues_with_the_next_candidate(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    local, run_dir = tmp_path / "local", tmp_path / "slurm" / "run"
    run_dir.parent.mkdir()
    reference = subprocess.Popen(  # the uninterrupted search, alongside
        [sys.executable, "-m", "dynlab.apps.search", *SEARCH, f"hydra.run.dir={local}"],
        env={k: v for k, v in cluster.items() if not k.startswith("SLURM_")},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    command = shlex.join(
        ["srun", sys.executable, "-m", "dynlab.apps.search", *SEARCH, f"hydra.run.dir={run_dir}"]
    )
    job = slurm(
        cluster,
        "sbatch",
        "--parsable",
        "--requeue",
        "--open-mode=append",
        f"--output={run_dir.parent / 'slurm-%j.out'}",
        f"--chdir={REPO}",
        f"--wrap=exec {command}",
    ).strip()
    ledger = run_dir / "checkpoints" / "search" / "candidates.json"
    diagnostics = lambda: logs(run_dir.parent)  # noqa: E731

    def first_candidate_saved() -> bool:
        return ledger.exists() and len(json.loads(ledger.read_text())) >= 1

    wait_until(first_candidate_saved, "the first candidate", diagnostics, every=0.2)
    slurm(cluster, "scancel", "--signal=USR1", job)  # Slurm's warning before the time limit

    def requeued() -> bool:
        info = slurm(cluster, "scontrol", "show", "job", job)
        if re.search(r"JobState=(COMPLETED|FAILED|CANCELLED)", info):
            pytest.fail(f"{job} ended instead of requeueing itself\n{diagnostics()}")
        return "Restarts=1" in info and "JobState=PENDING" in info

    wait_until(requeued, f"{job} to requeue itself", diagnostics)
    at_stop = json.loads(ledger.read_text())
    slurm(cluster, "scontrol", "update", f"jobid={job}", "starttime=now")
    wait_until(lambda: job_done(cluster, job), f"{job} to finish", diagnostics)

    log = next(run_dir.parent.glob("slurm-*.out")).read_text()
    stopped = re.search(r"stopped after candidate (\d+); .*requeued Slurm job", log)
    assert stopped and int(stopped.group(1)) < 5, diagnostics()  # during the search
    assert len(at_stop) == int(stopped.group(1)) + 1
    assert_completed([run_dir], diagnostics)
    final = json.loads(ledger.read_text())
    assert final[: len(at_stop)] == at_stop  # kept as saved (same seconds): none was run again
    assert reference.wait(timeout=JOB_TIMEOUT_S) == 0
    whole = json.loads((local / "checkpoints" / "search" / "candidates.json").read_text())
    same = ("index", "tokens", "reward", "accuracy", "exit_macs")
    assert [{k: c[k] for k in same} for c in final] == [{k: c[k] for k in same} for c in whole]
    assert results(run_dir)["metrics"] == results(local)["metrics"]
