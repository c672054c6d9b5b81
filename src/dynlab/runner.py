"""Builds a run from a composed config and drives a technique's schedule, phase by phase.

The apps are thin: they compose, call `validate_config`, then `run_schedule` / `evaluate`.
Everything here is instantiated from config; nothing knows about a particular technique.
"""

from __future__ import annotations

import copy
import hashlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, RichProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment

from dynlab import checkpointing as ckpt
from dynlab.backbones import UnknownBackboneError, is_known_backbone
from dynlab.config import BackboneConfig
from dynlab.data.base import DynlabDataModule
from dynlab.data.sampling import ResumableLoaderCallback
from dynlab.evaluation.callbacks import AnytimeEvaluation, BudgetedEvaluation
from dynlab.preemption import Preempted, PreemptionHandler
from dynlab.results import update_results
from dynlab.summary import print_summary
from dynlab.techniques.base import DynlabModule, Phase, PhaseContext, PhaseKind


class ConfigError(ValueError):
    """A composed config that cannot work, found before anything expensive starts."""


def validate_config(cfg: DictConfig) -> None:
    """Checks beyond the schemas' types: names that must exist and settings that must agree."""
    if not is_known_backbone(cfg.backbone.name):
        raise UnknownBackboneError(cfg.backbone.name)
    devices, strategy = cfg.trainer.devices, cfg.trainer.strategy
    multi_cpu = cfg.trainer.accelerator == "cpu" and isinstance(devices, int) and devices > 1
    if multi_cpu and strategy in ("auto", None):
        raise ConfigError(
            f"trainer.devices={devices} on CPU needs a DDP strategy: use trainer=ddp_cpu "
            "(or trainer.strategy=ddp)"
        )


def build_datamodule(cfg: DictConfig) -> DynlabDataModule:
    """The dataset's DataModule; a missing data root fails here with where to put the data."""
    return _instantiate(_without_name(cfg, "dataset"))


def build_module(cfg: DictConfig, datamodule: DynlabDataModule) -> DynlabModule:
    """The technique's LightningModule on the chosen backbone, sized for the dataset."""
    backbone = OmegaConf.to_object(cfg.backbone)
    assert isinstance(backbone, BackboneConfig)
    technique = _without_name(cfg, "technique")
    return _instantiate(technique, backbone=backbone, data_info=datamodule.info, _convert_="object")


def _instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, letting the constructor's own error (a missing data root, an
    incompatible backbone) reach the user instead of Hydra's wrapper around it."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise


def _without_name(cfg: DictConfig, group: str) -> DictConfig:
    """A group's node minus its `name`, which identifies the choice and is no constructor argument.

    Copied with its root so interpolations such as `${seed}` still resolve.
    """
    root = copy.deepcopy(cfg)
    with open_dict(root[group]):
        del root[group]["name"]
    return root[group]


def run_name(cfg: DictConfig) -> str:
    """A run is named by its overrides (the sweep's varying keys), or by its run dir."""
    if HydraConfig.initialized():
        name = HydraConfig.get().job.override_dirname
        if name:
            return name
    return Path(cfg.run_dir).name


def sweep_group(cfg: DictConfig) -> str:
    """All jobs of one sweep share a W&B group: the sweep dir; a single run is its own group."""
    if cfg.logger.group:
        return str(cfg.logger.group)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return "/".join(Path(HydraConfig.get().sweep.dir).parts[-2:])
    return Path(cfg.run_dir).name


def build_logger(cfg: DictConfig, phase: str) -> Logger | bool:
    """W&B (offline unless WANDB_MODE says otherwise), CSV, or nothing; one logger per phase."""
    run_dir = Path(cfg.run_dir)
    if cfg.logger.name == "none":
        return False
    if cfg.logger.name == "csv":
        return CSVLogger(save_dir=run_dir, name="csv", version=phase)
    tags = [*cfg.logger.tags, cfg.technique.name, cfg.backbone.name, cfg.dataset.name]
    # A stable id per (run dir, phase): a preempted and requeued phase continues the same W&B run.
    run_id = hashlib.sha1(f"{run_dir.resolve()}:{phase}".encode()).hexdigest()[:16]
    return WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        save_dir=str(run_dir),
        name=run_name(cfg),
        group=sweep_group(cfg),
        job_type=phase,
        tags=tags,
        id=run_id,
        resume="allow",
        mode=cfg.logger.mode,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def build_trainer(
    cfg: DictConfig, phase: Phase, logger: Logger | bool, extra_callbacks: list[Callback]
) -> pl.Trainer:
    """A Lightning trainer for one phase, checkpointing atomically into the phase's folder."""
    phase_dir = ckpt.phase_dir(cfg.run_dir, phase.name)
    kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    if phase.max_epochs is not None:
        kwargs["max_epochs"] = phase.max_epochs
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=phase_dir, filename="best", monitor="val/top1", mode="max", save_last=True
        ),
        ResumableLoaderCallback(),
        ckpt.RNGStateCallback(),
        *extra_callbacks,
    ]
    if kwargs.get("enable_progress_bar", True) and sys.stdout.isatty():
        callbacks.append(RichProgressBar())
    plugins: list[Any] = [ckpt.AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # dynlab's PreemptionHandler owns the Slurm signal (see dynlab.preemption): Lightning's
        # own requeue checkpoints inside the signal handler, possibly in the middle of a step.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return pl.Trainer(
        **kwargs,
        default_root_dir=str(phase_dir),
        logger=logger,
        callbacks=callbacks,
        plugins=plugins,
        # dynlab's samplers shard by rank themselves (exact resume, no padded eval samples).
        use_distributed_sampler=False,
    )


def evaluation_callbacks(cfg: DictConfig) -> list[Callback]:
    """The anytime and budgeted evaluations the config switches on."""
    callbacks: list[Callback] = []
    if cfg.evaluation.anytime:
        callbacks.append(AnytimeEvaluation(output_dir=cfg.run_dir))
    if cfg.evaluation.budgeted:
        qs = list(cfg.evaluation.qs) if cfg.evaluation.qs is not None else None
        callbacks.append(BudgetedEvaluation(output_dir=cfg.run_dir, qs=qs))
    return callbacks


@contextmanager
def finishing_logger(logger: Logger | bool) -> Iterator[None]:
    """Closes a phase's W&B run even on errors, so the next job of a multirun starts its own."""
    try:
        yield
    finally:
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish()


def next_phase(module: DynlabModule, cfg: DictConfig) -> Phase | None:
    """The first phase of the schedule not finished yet (the schedule may grow as phases end)."""
    return next((p for p in module.phases(cfg.mode) if not ckpt.is_done(cfg.run_dir, p.name)), None)


def restore_finished_phases(module: DynlabModule, cfg: DictConfig) -> None:
    """On a rerun, load the outcome of the last finished phase before continuing the schedule.

    Loading it may grow the schedule (a finished search knows its retrain phases), so repeat until
    no later finished phase appears.
    """
    loaded: Phase | None = None
    while True:
        done = [p for p in module.phases(cfg.mode) if ckpt.is_done(cfg.run_dir, p.name)]
        if not done or done[-1] == loaded:
            return
        loaded = done[-1]
        ckpt.load_module_state(module, ckpt.phase_dir(cfg.run_dir, loaded.name) / ckpt.FINAL)


def run_schedule(
    cfg: DictConfig, module: DynlabModule, datamodule: DynlabDataModule, callbacks: list[Callback]
) -> None:
    """Run every unfinished phase in order, each resuming from its own last checkpoint."""
    restore_finished_phases(module, cfg)
    while (phase := next_phase(module, cfg)) is not None:
        if _is_global_zero():
            update_results(cfg.run_dir, status="running", phase=phase.name)
        module.start_phase(phase)
        pdir = ckpt.phase_dir(cfg.run_dir, phase.name)
        if phase.kind == PhaseKind.custom:
            module.run_custom_phase(phase, PhaseContext(Path(cfg.run_dir), pdir, datamodule, cfg))
            if _is_global_zero():
                ckpt.save_module_state(module, pdir / ckpt.FINAL)
        else:
            logger = build_logger(cfg, phase.name)
            with finishing_logger(logger):
                trainer = build_trainer(cfg, phase, logger, callbacks)
                resume = ckpt.resume_path(cfg.run_dir, phase.name)
                # The run's own checkpoint (it holds RNG states and config dataclasses, which
                # torch's weights-only unpickler refuses).
                trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=False)
                if trainer.interrupted:
                    raise KeyboardInterrupt(f"phase '{phase.name}' was interrupted")
                trainer.save_checkpoint(pdir / ckpt.FINAL)
        if _is_global_zero():
            ckpt.mark_done(cfg.run_dir, phase.name)
        _barrier()


def evaluate(
    cfg: DictConfig, module: DynlabModule, datamodule: DynlabDataModule
) -> dict[str, float]:
    """Test metrics plus the anytime and budgeted evaluations, in a W&B run of job type `evaluate`."""
    logger = build_logger(cfg, "evaluate")
    with finishing_logger(logger):
        trainer = build_trainer(cfg, Phase("evaluate"), logger, evaluation_callbacks(cfg))
        (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in metrics.items()}


def _is_global_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run_job(cfg: DictConfig) -> float | None:
    """One job of `dynlab-train` / `dynlab-search`: the whole schedule, then the evaluations.

    Returns the final test top-1 (Hydra sweepers can optimise it); raises `Preempted` when stopped
    by a Slurm signal after checkpointing.
    """
    validate_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    if _is_global_zero():
        update_results(cfg.run_dir, status="running", error=None, **run_identity(cfg))
    try:
        run_schedule(cfg, module, datamodule, [PreemptionHandler()])
        metrics = evaluate(cfg, module, datamodule)
    except Preempted:
        # Re-raised (a SystemExit): a requeued job must not report a result to submitit/Hydra.
        print(f"[dynlab] preempted: checkpoint saved in {cfg.run_dir}; the job resumes there.")
        raise
    except BaseException as err:
        if _is_global_zero():
            update_results(cfg.run_dir, status="failed", error=f"{type(err).__name__}: {err}")
        raise
    if _is_global_zero():
        results = update_results(
            cfg.run_dir,
            status="completed",
            phase=None,
            metrics=metrics,
            params=sum(p.numel() for p in module.model.parameters()),
            exit_macs=module.exit_macs(datamodule.info.input_size),
        )
        print_summary(results, cfg.run_dir)
    return metrics.get("test/top1")


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """What a report needs to place a run: names, overrides and the resolved config."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return {
        "technique": cfg.technique.name,
        "backbone": cfg.backbone.name,
        "dataset": cfg.dataset.name,
        "overrides": overrides,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
