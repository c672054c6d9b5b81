"""A search step's candidates as one Slurm job array (dynlab.search.array), on the real one-node
cluster of slurm/local-cluster.sh (tests marked `slurm`; fixtures and helpers of test_slurm.py).

A tiny S2DNAS search on digits (2 iterations x 2 candidates, 2 batches each) run with
`hydra/launcher=slurm` sends each iteration out as one array and ends with the records of the
same search run in-process (candidates are seeded by index); tasks that die or are requeued by
Slurm still give every record. Array tasks import torch and Lightning: ~20-30 s each on the
loaded 2-core machine, so each test takes a minute or two.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from dynlab.apps._hydra import CONFIG_MODULE
from dynlab.config import BackboneConfig
from dynlab.data.digits import DigitsDataModule
from dynlab.search.array import (
    ARRAY_JOBS,
    ArrayConfig,
    CandidateFailed,
    hydra_slurm_launcher,
    map_array,
)
from dynlab.search.driver import ARRAY_FOLDER
from dynlab.search.ledger import RECORDS as CANDIDATES
from dynlab.search.ledger import STATE as SEARCH_STATE
from dynlab.techniques.base import Phase, PhaseContext, PhaseKind
from dynlab.techniques.s2dnas import module as s2dnas_module
from dynlab.techniques.s2dnas.config import S2DNASConfig, S2DNASSearchConfig
from dynlab.techniques.s2dnas.module import S2DNASModule
from dynlab.validation import build_run

from .conftest import S2D_SEARCH, compose_in, technique_config
from .test_slurm import JOB_TIMEOUT_S, cluster, dynlab, logs, results, slurm, slurm_env  # noqa: F401

# Array tasks unpickle this module's helpers by value: they need not import the tests package.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = S2DNASSearchConfig(iterations=2, candidates_per_iteration=2, candidate_batches=2, top_k=1)
VARYING = ("seconds", "rank", "slurm_job")  # where and how long a candidate ran
SEARCH = Phase("search", PhaseKind.custom)


def search_in(run_dir: Path) -> list[dict[str, Any]]:
    """The search phase of a tiny digits S2DNAS run in `run_dir`; its records."""
    torch.manual_seed(0)
    datamodule = DigitsDataModule(val_size=48, batch_size=16, eval_batch_size=48)
    config = technique_config(S2DNASConfig, num_stages=2, groups=4, search=TINY)
    module = S2DNASModule(config, BackboneConfig(name="cifar_resnet20"), datamodule.info)
    module.start_phase(SEARCH)
    module.run_custom_phase(SEARCH, PhaseContext(run_dir, run_dir / "search", datamodule, None))
    return json.loads((run_dir / "search" / CANDIDATES).read_text())


def same_part(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in VARYING} for r in records]


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The records of the tiny search run in this process (no Hydra launcher)."""
    assert hydra_slurm_launcher() is None
    return search_in(tmp_path_factory.mktemp("in_process"))


@pytest.fixture
def launched_with_slurm(tmp_path: Path) -> Iterator[None]:
    """HydraConfig as in a job that `dynlab-search -m hydra/launcher=slurm` launched."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(
            "search",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.timeout_min=10",
                "hydra.launcher.setup=[echo candidate-setup]",
                f"hydra.sweep.dir={tmp_path / 'sweep'}",
            ],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    yield
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


def test_array_settings_come_from_the_hydra_slurm_launcher(
    launched_with_slurm: None, tmp_path: Path
) -> None:
    config = ArrayConfig.from_hydra(tmp_path / "array", gpus_per_task=1)
    params = config.parameters
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (1, 1, 1)
    assert params["timeout_min"] == 10
    assert params["slurm_setup"] == ["echo candidate-setup"]
    assert params["slurm_array_parallelism"] == 256
    # Slurm may requeue a task; dynlab's USR1 (a fit's checkpoint signal) is not passed on.
    assert params["slurm_additional_parameters"] == {"requeue": True}
    assert "slurm_partition" not in params  # null: the cluster's default
    assert config.folder == tmp_path / "array"


def test_no_array_outside_a_slurm_launch(tmp_path: Path) -> None:
    assert hydra_slurm_launcher() is None
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("search", return_hydra_config=True)  # Hydra's basic launcher
    HydraConfig.instance().set_config(cfg)
    try:
        assert hydra_slurm_launcher() is None
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    assert ArrayConfig.from_hydra(tmp_path).parameters["timeout_min"] == 60


@pytest.mark.slurm
@pytest.mark.slow
def test_search_launched_on_slurm_runs_each_iteration_as_one_array_with_in_process_records(
    cluster: dict[str, str],  # noqa: F811
    launched_with_slurm: None,
    in_process: list[dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = tmp_path / "run"
    submitit = run_dir / "search" / ARRAY_FOLDER
    records = search_in(run_dir)

    assert same_part(records) == same_part(in_process), logs(submitit)
    # One array per iteration, task j = candidate j of the iteration.
    arrays = [r["slurm_job"].split("_") for r in records]
    assert arrays[0][0] == arrays[1][0] != arrays[2][0] == arrays[3][0]
    assert [task for _, task in arrays] == ["0", "1", "0", "1"]
    script = (submitit / arrays[0][0] / f"{arrays[0][0]}_submission.sh").read_text().splitlines()
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --time=10" in script
    assert not [line for line in script if "USR1" in line]
    assert "echo candidate-setup" in script
    state = torch.load(run_dir / "search" / SEARCH_STATE, weights_only=False)["state"]
    assert state[ARRAY_JOBS] == {} and not list(submitit.glob("shared_*.pkl"))


@pytest.mark.slurm
@pytest.mark.slow
def test_dynlab_search_multirun_on_slurm_submits_its_candidates_from_its_job(
    cluster: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    """The whole path: `dynlab-search -m hydra/launcher=slurm` runs the controller as a Slurm job,
    which submits each iteration's candidates as an array from inside its own allocation."""
    sweep = tmp_path / "sweep"
    dynlab(
        "search",
        "-m",
        "hydra/launcher=slurm",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=job",
        "hydra.launcher.timeout_min=20",
        *S2D_SEARCH,
        "technique.search.iterations=1",
        "technique.search.candidate_batches=2",
        "technique.search.top_k=1",
        "technique.search.retrain_epochs=1",
        "dataset.batch_size=16",
        "logger=csv",
        "seed=0",
        env=cluster,
        cwd=tmp_path,
        timeout=JOB_TIMEOUT_S,
    )
    run_dir = sweep / "job"
    diagnostics = lambda: logs(sweep / ".submitit", run_dir / "checkpoints")  # noqa: E731
    assert results(run_dir).get("status") == "completed", diagnostics()
    (controller,) = [p.name for p in (sweep / ".submitit").iterdir() if p.is_dir()]
    records = json.loads((run_dir / "checkpoints" / "search" / CANDIDATES).read_text())
    jobs = [r["slurm_job"] for r in records]
    assert [j.split("_")[1] for j in jobs] == ["0", "1"], diagnostics()
    assert jobs[0].split("_")[0] == jobs[1].split("_")[0] != controller
    (script,) = (run_dir / "checkpoints" / "search" / ARRAY_FOLDER).glob("*/*_submission.sh")
    lines = script.read_text().splitlines()
    assert "#SBATCH --job-name=search-candidates" in lines and "#SBATCH --time=20" in lines


# A tiny SPOS evolution on digits: 2 generations of 2 candidates of the 5-layer space, scored from
# the untrained supernet of seed 0 (its supernet phase is not run: scores need not be good, only
# the same wherever they are computed).
SPOS_EVOLUTION = [
    "technique=spos",
    "backbone=cifar_spos_supernet_tiny",
    "dataset=digits",
    "technique.evolution.population=2",
    "technique.evolution.generations=2",
    "technique.evolution.parents=1",
    "technique.evolution.mutations=1",
    "technique.evolution.crossovers=0",
    "technique.evolution.recalibration_batches=2",
    "technique.evolution.recalibration_batch_size=32",
    "technique.evolution.val_images=100",
    "seed=0",
]
EVOLUTION = Phase("evolution", PhaseKind.custom)


def evolution_in(run_dir: Path, *overrides: str) -> list[dict[str, Any]]:
    """The evolution phase of the tiny SPOS run in `run_dir`, composed with `overrides`; its
    records."""
    return custom_phase_in(run_dir, EVOLUTION, "search", [*SPOS_EVOLUTION, *overrides])


def custom_phase_in(
    run_dir: Path, phase: Phase, config_name: str, overrides: list[str]
) -> list[dict[str, Any]]:
    """Custom `phase` of the run composed from `overrides` in `run_dir`; its records."""
    torch.manual_seed(0)
    try:
        cfg = compose_in(overrides, config_name, run_dir)
        datamodule, module = build_run(cfg)
        module.start_phase(phase)
        phase_dir = run_dir / phase.name
        module.run_custom_phase(phase, PhaseContext(run_dir, phase_dir, datamodule, cfg))
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    return json.loads((phase_dir / CANDIDATES).read_text())


@pytest.mark.slurm
@pytest.mark.slow
def test_spos_evolution_on_a_slurm_array_equals_its_in_process_run(
    cluster: dict[str, str],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SPOS on the search driver: launched with `hydra/launcher=slurm`, each generation goes out
    as one job array, and the records (genes, MACs, origin, parents, val top-1) are those of the
    same evolution in this process."""
    in_process = evolution_in(tmp_path / "in_process")
    assert {r["rank"] for r in in_process} == {0} and "slurm_job" not in in_process[0]
    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = tmp_path / "array"
    launcher = ["hydra/launcher=slurm", "hydra.launcher.timeout_min=10"]
    records = evolution_in(run_dir, *launcher, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    submitit = run_dir / "evolution" / ARRAY_FOLDER
    assert same_part(records) == same_part(in_process), logs(submitit)
    arrays = [r["slurm_job"].split("_") for r in records]
    assert arrays[0][0] == arrays[1][0] != arrays[2][0] == arrays[3][0]
    assert [task for _, task in arrays] == ["0", "1"] * 2
    assert [r["origin"] for r in records] == ["random", "random", "mutation", "random"]
    result = json.loads((run_dir / "evolution" / "search_result.json").read_text())
    assert (
        result["architecture"]
        == json.loads((tmp_path / "in_process" / "evolution" / "search_result.json").read_text())[
            "architecture"
        ]
    )


def rank_in(run_dir: Path, *overrides: str) -> list[dict[str, Any]]:
    """The rank phase of the tiny SPOS space's untrained supernet in `run_dir`: 3 architectures,
    each trained alone twice for 2 batches; its records."""
    settings = [
        "technique.ranking.architectures=3",
        "technique.ranking.epochs=1",
        "technique.ranking.batches_per_epoch=2",
        "technique.ranking.bootstrap=50",
    ]
    rank = Phase("rank", PhaseKind.custom)
    return custom_phase_in(run_dir, rank, "rank", [*SPOS_EVOLUTION, *settings, *overrides])


@pytest.mark.slurm
@pytest.mark.slow
def test_a_ranking_on_a_slurm_array_equals_its_in_process_run(
    cluster: dict[str, str],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """dynlab-rank's architectures go out as one job array under `hydra/launcher=slurm`, and
    come back with the inherited and trained-alone scores of the same ranking in this process."""
    in_process = rank_in(tmp_path / "in_process")
    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = tmp_path / "array"
    launcher = ["hydra/launcher=slurm", "hydra.launcher.timeout_min=10"]
    records = rank_in(run_dir, *launcher, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert same_part(records) == same_part(in_process), logs(run_dir / "rank" / ARRAY_FOLDER)
    assert len({r["slurm_job"].split("_")[0] for r in records}) == 1
    assert all(len(r["alone_top1"]) == 2 for r in records)


class Faulty:
    """A candidate evaluation whose first attempt at `lost` dies (no result: resubmitted by the
    controller) and whose first attempt at `requeued` waits to be requeued by Slurm."""

    def __init__(self, evaluate: Any, markers: Path, lost: int, requeued: int) -> None:
        self.evaluate, self.markers, self.lost, self.requeued = evaluate, markers, lost, requeued

    def __call__(self, settings: Any, index: int) -> dict[str, Any]:
        marker = self.markers / f"{index}.first"
        if index in (self.lost, self.requeued) and not marker.exists():
            task = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            marker.write_text(task)
            if index == self.lost:
                os._exit(3)
            time.sleep(600)  # until `scontrol requeue`
        return self.evaluate(settings, index)


def requeue_when_started(
    env: dict[str, str], marker: Path, errors: list[BaseException], deadline_s: float = 600
) -> None:
    """`scontrol requeue` the task named in `marker` once it exists, then lift Slurm's hold."""
    try:
        deadline = time.monotonic() + deadline_s
        while not marker.exists():
            assert time.monotonic() < deadline, f"no {marker}"
            time.sleep(0.5)
        task = marker.read_text()
        slurm(env, "scontrol", "requeue", task)
        while True:
            info = slurm(env, "scontrol", "show", "job", task)
            if "Restarts=1" in info and "JobState=PENDING" in info:
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.5)
        slurm(env, "scontrol", "update", f"jobid={task}", "starttime=now")
    except BaseException as err:  # reported by the test
        errors.append(err)


@pytest.mark.slurm
@pytest.mark.slow
def test_lost_and_requeued_array_tasks_still_complete_every_step(
    cluster: dict[str, str],  # noqa: F811
    in_process: list[dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    submitit = run_dir / "search" / ARRAY_FOLDER
    driver = s2dnas_module.SearchDriver

    def faulty_driver(search: Any, phase_dir: Path, seed: int, *_: Any) -> Any:
        # the module's own placement is replaced by this test's array, its candidates by faulty ones
        search.evaluate = Faulty(search.evaluate, markers, lost=1, requeued=2)
        return driver(
            search, phase_dir, seed, array=ArrayConfig.from_hydra(submitit, poll_s=1, grace_s=5)
        )

    monkeypatch.setattr(s2dnas_module, "SearchDriver", faulty_driver)
    errors: list[BaseException] = []
    requeuer = threading.Thread(
        target=requeue_when_started, args=(cluster, markers / "2.first", errors), daemon=True
    )
    requeuer.start()
    records = search_in(run_dir)
    requeuer.join(timeout=60)
    assert not errors, f"{errors[0]!r}\n{logs(submitit)}"

    assert same_part(records) == same_part(in_process), logs(submitit)
    jobs = [r["slurm_job"] for r in records]
    # Candidate 1's task died: the controller resubmitted it as an array of its own.
    assert jobs[1].split("_")[0] not in (jobs[0].split("_")[0], jobs[2].split("_")[0])
    assert (markers / "1.first").read_text().split("_")[0] == jobs[0].split("_")[0]
    # Candidate 2's task was requeued by Slurm and ran again in place: not resubmitted.
    assert (markers / "2.first").read_text() == jobs[2]
    assert jobs[2].split("_")[0] == jobs[3].split("_")[0]
    assert "Restarts=1" in slurm(cluster, "scontrol", "show", "job", jobs[2])


def tenfold(key: int) -> int:
    if key == 2:
        raise ValueError(f"candidate {key} is broken")
    return 10 * key


class Stop(Exception):
    pass


def stop() -> None:
    raise Stop


@pytest.mark.slurm
@pytest.mark.slow
def test_a_resumed_controller_waits_for_its_tasks_and_a_candidate_error_reaches_it(
    cluster: dict[str, str],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    config = ArrayConfig.from_hydra(tmp_path / "submitit", poll_s=1, grace_s=5)
    jobs: dict[int, list[str]] = {}
    with pytest.raises(Stop):  # the controller is stopped right after submitting
        map_array(tenfold, [0, 1], config, jobs, on_wait=stop)
    submitted = {key: job for key, (job, _) in jobs.items()}
    assert sorted(submitted) == [0, 1]

    ran: dict[int, str] = {}
    results = map_array(
        tenfold, [0, 1], config, jobs, on_result=lambda key, _, job: ran.setdefault(key, job)
    )
    assert results == {0: 0, 1: 10}
    assert ran == submitted  # waited for, not submitted again
    assert jobs == {} and not list(config.folder.glob("shared_*.pkl"))

    with pytest.raises(CandidateFailed) as failed:
        map_array(tenfold, [2], config)
    message = str(failed.value)
    assert "ValueError: candidate 2 is broken" in message
    log = re.search(r"\(log (\S+)\)", message)
    assert log and Path(log.group(1)).exists(), message
    assert "_0_log.err" in log.group(1)
    # Not retried: a genuine error would only happen again.
    assert len(list(config.folder.glob(".submission_file_*.sh"))) == 2
