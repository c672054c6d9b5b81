"""What every Hydra entry point of dynlab shares: where the configs are, user errors in one line,
cheap checks before heavy imports, and DDP relaunch hygiene.

Nothing here imports torch or Lightning: a typo, a wrong type or a bad combination is reported
in about a second; the runner (torch, Lightning, timm) is imported once the config passed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write

from dynlab.config import register_configs
from dynlab.errors import reporting_user_errors
from dynlab.validation import validate_config

# The repo's conf/ (the package is installed editable from the repo, see pyproject.toml).
CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "conf")

register_configs()

_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def run_schedule_app(prog: str, cfg: DictConfig) -> float | None:
    """`dynlab-train` / `dynlab-search`: check the config, then import the runner and run the job.

    A user error (config, data, checkpoint, divergence) is one line on stderr and exit status 2.
    """
    with reporting_user_errors(prog):
        validate_config(cfg)
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
