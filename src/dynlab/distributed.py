"""A job's processes, started before its first phase, so every phase runs in every process.

Lightning starts the ranks of a DDP job inside `trainer.fit`: ranks > 0 re-execute the command
(see apps/_hydra.py `ddp_job_scope`). A schedule that opens with a custom phase (a search) would
run it in one process only. `start_job_processes` does up front what the configured trainer's
strategy does at fit time: its launcher starts the other local processes (none under srun or
torchrun, which start them), and its `setup_environment` joins the process group (gloo on CPUs,
NCCL on GPUs) and selects this rank's device. Later Trainers find the processes started
(LOCAL_RANK is set) and the process group initialised, and reuse both.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf


def start_job_processes(cfg: DictConfig) -> int:
    """Start the job's processes and join its process group, if `cfg.trainer` asks for DDP;
    returns the world size (1: a single process, nothing started)."""
    import pytorch_lightning as pl
    import torch.distributed as dist
    from pytorch_lightning.plugins.environments import SLURMEnvironment
    from pytorch_lightning.strategies import DDPStrategy
    from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    plugins: list[Any] = []
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))  # dynlab.preemption owns signals
    banner = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = banner.level
    banner.setLevel(logging.WARNING)
    try:
        kwargs.update(
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            plugins=plugins,
        )
        trainer = pl.Trainer(**kwargs)
    finally:
        banner.setLevel(level)
    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy):
        return 1
    if not isinstance(strategy.launcher, _SubprocessScriptLauncher):
        # ddp_spawn & co. run a function, not the script, in new processes: left to Lightning.
        return 1
    strategy.launcher.launch(strategy.setup_environment, trainer=trainer)
    return dist.get_world_size()
