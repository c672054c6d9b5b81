"""What every Hydra entry point of dynlab shares: where the configs are, and DDP relaunch hygiene."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict, read_write

from dynlab.config import register_configs

# The repo's conf/ (the package is installed editable from the repo, see pyproject.toml).
CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "conf")

register_configs()

_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


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
