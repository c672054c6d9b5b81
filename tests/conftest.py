"""Shared test helpers: run dynlab's real apps on tiny configs, in-process or as the CLI would."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from dynlab.apps._hydra import CONFIG_MODULE
from dynlab.config import TechniqueConfig
from dynlab.runner import run_job

REPO = Path(__file__).resolve().parents[1]

# A run small enough for a 2-core CI machine: one epoch of a small net, CSV logs...
TINY_RUN = [
    "technique=baseline",
    "backbone=cifar_resnet20",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]
# ... on a few dozen synthetic images.
TINY = [
    "dataset=synthetic",
    "dataset.num_train=96",
    "dataset.num_test=64",
    "dataset.val_size=32",
    "dataset.batch_size=32",
    *TINY_RUN,
]

# A tiny S2DNAS search (2 stages, 2 candidates an iteration) on synthetic images; each test adds
# its iterations, candidate batches, top-k, batch size and logger.
S2D_SEARCH = [
    "technique=s2dnas",
    "technique.num_stages=2",
    "technique.groups=4",
    "technique.search.candidates_per_iteration=2",
    "dataset=synthetic",
    "dataset.num_train=96",
    "dataset.num_test=32",
    "dataset.val_size=32",
    "backbone=cifar_resnet20",
    "trainer.enable_progress_bar=false",
    "evaluation.budgeted=false",
]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Latency at the end of every run is off in the tests (their own latency tests switch it on).
os.environ.setdefault("DYNLAB_LATENCY", "false")
# Latency tables the tests build (timed on a machine busy with tests) go to a folder of this
# process, never into the user's cache.
os.environ["DYNLAB_CACHE"] = tempfile.mkdtemp(prefix="dynlab-test-cache-")
atexit.register(shutil.rmtree, os.environ["DYNLAB_CACHE"], True)
torch.set_num_threads(1)


def compose_in(overrides: list[str], config_name: str, run_dir: Path) -> DictConfig:
    """Compose a config as `dynlab-train` (config) or `dynlab-search` (search) would, with its run
    dir at `run_dir` (module-scoped fixtures use it directly)."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


def search_once(factory: pytest.TempPathFactory, name: str, overrides: list[str]) -> Path:
    """One dynlab-search run of `overrides` in a fresh folder (a module-scoped fixture's run,
    shared by the module's tests); returns its run dir."""
    run = factory.mktemp(name) / "search"
    run_job(compose_in(overrides, "search", run))
    return run


Schema = TypeVar("Schema", bound=TechniqueConfig)


def technique_config(schema: type[Schema], seed: int = 0, **fields: Any) -> Schema:
    """A technique's typed config as `build_module` hands it to the module: the schema's defaults
    with `fields` (type-checked), `${seed}` resolved to `seed`."""
    root = OmegaConf.create({"seed": seed})
    root.technique = OmegaConf.merge(OmegaConf.structured(schema), fields)
    return OmegaConf.to_object(root.technique)  # type: ignore[return-value]


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Iterator:
    """Compose a config as `dynlab-train` would, with its run dir under tmp_path."""

    def _compose(
        overrides: list[str], config_name: str = "config", run_dir: Path | None = None
    ) -> DictConfig:
        return compose_in(overrides, config_name, run_dir or tmp_path / "run")

    yield _compose
    GlobalHydra.instance().clear()


def run_cli(
    app: str,
    args: list[str],
    cwd: Path,
    timeout: float = 600,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `python -m dynlab.apps.<app> args...` as a user would (plus `env`), outputs under cwd.

    Output goes to files, not pipes: W&B's service process outlives the app and would hold a
    pipe open until it exits.
    """
    env = {**os.environ, **(env or {}), "DYNLAB_OUTPUTS": str(cwd / "out"), "OMP_NUM_THREADS": "1"}
    out, err = cwd / f"{app}.stdout", cwd / f"{app}.stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.run(
            [sys.executable, "-m", f"dynlab.apps.{app}", *args],
            cwd=cwd,
            env=env,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )
    proc.stdout, proc.stderr = out.read_text(), err.read_text()
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{app} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order and group the tests for pytest-xdist (`make test-all` runs `--dist loadgroup`).

    The Slurm tests queue on one one-node cluster, so they share one worker (group "slurm"); the
    tests of a module that share a module- or session-scoped fixture (one trained run read by
    several tests) share a worker too, so that run is made once. Modules with Slurm or slow tests
    come first, each kept whole, so the longest work starts while the other worker takes the rest.
    """
    rank: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif any(
            d.scope in ("module", "session") and d.baseid == module  # defined in that module
            for defs in item._fixtureinfo.name2fixturedefs.values()
            for d in defs
        ):
            item.add_marker(pytest.mark.xdist_group(module))
        slow = (
            0 if item.get_closest_marker("slurm") else 1 if item.get_closest_marker("slow") else 2
        )
        rank[module] = min(rank.get(module, 2), slow)
    items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])  # stable: modules stay whole
