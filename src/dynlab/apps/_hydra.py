"""What every Hydra entry point of dynlab shares: where the configs are, every user error in one
line (Hydra's own too), cheap checks before heavy imports, and DDP relaunch hygiene.

Nothing here imports torch or Lightning: a typo, a wrong type, a bad combination, a missing data
root or checkpoint is reported in about a second; the runner (torch, Lightning, timm) is imported
once the config passed.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from dynlab.config import register_configs
from dynlab.errors import exit_with_user_error, full_error, reporting_user_errors
from dynlab.validation import slurm_problem, validate_run

# The configs ship inside the package, so an installed dynlab (a wheel, not only the checkout)
# finds them: `CONFIG_PATH` for @hydra.main, `CONFIG_MODULE` for Hydra's compose API, and
# `CONFIG_DIR` where a folder on disk is needed (listing the options of a group).
CONFIG_MODULE = "dynlab.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")

register_configs()

_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Lines of Hydra's and OmegaConf's messages that are detail, not the error.
_DETAIL_LINES = ("full_key:", "object_type=", "reference_type=", "provider=", "See https://")
# The module of hydra-submitit-launcher's launchers (`hydra/launcher=slurm`).
_SUBMITIT_LAUNCHER = "hydra_plugins.hydra_submitit_launcher"


def dynlab_main(prog: str, config_name: str) -> Callable[[TaskFunction], Callable[..., Any]]:
    """`hydra.main` for a dynlab app: its configs, and Hydra's own errors (an unknown option, a
    wrong type, a misspelt key) reported as dynlab's are: one line, exit status 2."""

    def decorate(task: TaskFunction) -> Callable[..., Any]:
        hydra_main = hydra.main(
            config_path=CONFIG_PATH, config_name=config_name, version_base="1.3"
        )(task)

        @functools.wraps(task)
        def main(cfg_passthrough: DictConfig | None = None) -> Any:
            with hydra_errors_in_one_line(prog, task):
                return hydra_main(cfg_passthrough)

        return main

    return decorate


@contextmanager
def hydra_errors_in_one_line(prog: str, task: TaskFunction) -> Iterator[None]:
    """While Hydra runs the app, what fails before the job starts (composition, a Slurm launch
    that cannot submit) is one line and exit status 2; the job's own errors keep Hydra's report.

    Hydra has no hook for it: it reports through `hydra._internal.utils.run_and_report` (several
    lines, exit status 1; `HYDRA_FULL_ERROR=1`: the traceback), so that is wrapped meanwhile.
    """
    from hydra._internal import utils as hydra_utils

    report = hydra_utils.run_and_report

    def run_and_report(func: Callable[[], Any]) -> Any:
        return report(lambda: _before_the_job_in_one_line(prog, task, func))

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = report


def _before_the_job_in_one_line(prog: str, task: TaskFunction, func: Callable[[], Any]) -> Any:
    """`func()`, with an error of Hydra's that the job did not raise reported in one line."""
    try:
        return func()
    except Exception as err:
        in_job = any(frame.f_code is task.__code__ for frame in _frames(err))
        message = None if full_error() or in_job else hydra_error_message(err)
        if message is None:
            raise
        exit_with_user_error(prog, message)


def hydra_error_message(err: Exception) -> str | None:
    """One line for an error of Hydra's before any job ran (None: not one, keep its report)."""
    if any(_module(frame).startswith(_SUBMITIT_LAUNCHER) for frame in _frames(err)):
        return slurm_problem(_lines(err)[-1])
    if isinstance(err, MissingConfigException):
        return _missing_option(err)
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
        return _unknown_key(cause)
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        return f"{cause.full_key}: {_lines(cause)[0]}"
    if isinstance(err, HydraException | OmegaConfBaseException):
        return "; ".join(_lines(err))
    return None


def _missing_option(err: MissingConfigException) -> str:
    """`backbone=nope`: a near miss if there is one, and the group's options."""
    missing = err.missing_cfg_file or ""
    # The override as typed (`+experiment=spos/digitz`: group experiment), else the file's folder.
    typed = (arg.lstrip("+~").split("=", 1) for arg in sys.argv[1:] if "=" in arg)
    group, option = next(
        ((key, value) for key, value in typed if f"{key}/{value}" == missing),
        missing.rpartition("/")[::2],
    )
    if not group:
        return _lines(err)[0]
    options = list(err.options or []) or sorted(
        str(path.relative_to(Path(CONFIG_DIR, group)).with_suffix(""))
        for path in Path(CONFIG_DIR, group).rglob("*.yaml")
    )
    close = difflib.get_close_matches(option, options, n=1)
    hint = f"did you mean {group}={close[0]}? " if close else ""
    return f"{group}={option}: no such option; {hint}the options of {group}: {', '.join(options)}"


def _unknown_key(err: OmegaConfBaseException) -> str:
    """`trainer.max_epoch=3`: the closest key of the node, or its keys."""
    parent, key = err.parent_node, str(err.key)
    keys = [str(k) for k in parent] if isinstance(parent, DictConfig) else []
    if key in keys:  # another key error (a missing value, a read-only node)
        return f"{err.full_key}: {_lines(err)[0]}"
    prefix = str(err.full_key).removesuffix(key)
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f"did you mean {prefix}{close[0]}? " if close else ""
    listed = f"the keys there: {', '.join(keys)}" if keys and not close else ""
    # A typed schema node (TrainerConfig, a technique's config) takes no new key; a map of typed
    # entries (technique.phases) takes a new entry only as a whole map; a free-form one
    # (backbone.kwargs) takes it with `+`.
    typed = isinstance(parent, DictConfig) and OmegaConf.get_type(parent) not in (dict, None)
    entries = getattr(getattr(parent, "_metadata", None), "element_type", None)
    if typed:
        adds = ""
    elif isinstance(entries, type) and entries is not Any:
        adds = f"'++{prefix.rstrip('.')}={{{key}: {{...}}}}' adds it"
    else:
        adds = f"+{err.full_key}=... adds one"
    return f"{err.full_key}: no such key; " + "; ".join(p for p in (hint + listed, adds) if p)


def _lines(err: BaseException) -> list[str]:
    """The lines of an error's message that say what is wrong (no key details, no search path);
    its type's name when it has none."""
    lines = []
    for line in str(err).splitlines():
        line = line.strip()
        if line.startswith("Config search path"):
            break
        if line and not line.startswith(_DETAIL_LINES):
            lines.append(line)
    return lines or [type(err).__name__]


def _frames(err: BaseException) -> Iterator[FrameType]:
    """The frames `err` passed through, outermost first."""
    tb = err.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def _module(frame: FrameType) -> str:
    return str(frame.f_globals.get("__name__", ""))


def run_schedule_app(prog: str, cfg: DictConfig) -> float | None:
    """`dynlab-train` / `dynlab-search` / `dynlab-rank`: check the config and what the run needs of this machine,
    then import the runner and run the job.

    A user error (config, data, checkpoint, divergence) is one line on stderr and exit status 2.
    """
    with reporting_user_errors(prog):
        validate_run(cfg)
        from dynlab.runner import run_job  # torch, Lightning, timm: only for a valid config

        with ddp_job_scope(cfg.run_dir):
            return run_job(cfg)


@contextmanager
def ddp_job_scope(run_dir: str) -> Iterator[None]:
    """Make Lightning's DDP relaunch re-run exactly this job, and leave no trace for the next one.

    Lightning starts ranks > 0 by re-executing `sys.argv` plus `hydra.run.dir=<hydra.run.dir>`:
    in a multirun that would re-sweep every job, into the wrong folder. The children instead get
    this job's own overrides and its run dir. Lightning also leaves LOCAL_RANK & co. in the
    environment, which would make the next job of a multirun believe its ranks were started.
    """
    saved_env = {k: os.environ.get(k) for k in _DDP_ENV}
    saved_argv = list(sys.argv)
    launching = "LOCAL_RANK" not in os.environ and HydraConfig.initialized()
    if launching:
        sys.argv = [sys.argv[0], *HydraConfig.get().overrides.task]
        with read_write(HydraConfig.get()), open_dict(HydraConfig.get()):
            HydraConfig.get().run.dir = str(Path(run_dir).resolve())
    try:
        yield
    finally:
        sys.argv = saved_argv
        if launching:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
