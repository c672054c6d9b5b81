"""Builds a run from a composed config and drives a technique's schedule, phase by phase.

The apps are thin: they compose, call `validate_config`, then `run_schedule` / `evaluate`.
Everything here is instantiated from config; nothing knows about a particular technique.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, RichProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.strategies import DDPStrategy

from dynlab import checkpointing as ckpt
from dynlab import provenance
from dynlab.config import PhaseRecipe, TrainSplit
from dynlab.data.base import DynlabDataModule, StreamSpec
from dynlab.data.sampling import ResumableLoaderCallback
from dynlab.distributed import start_job_processes
from dynlab.divergence import DivergenceGuard
from dynlab.ema import EMA
from dynlab.evaluation.callbacks import (
    AnytimeEvaluation,
    BudgetedEvaluation,
    LatencyEvaluation,
    TechniqueFigures,
)
from dynlab.logging import announce_phase, quiet_console, wandb_mode
from dynlab.preemption import Preempted, PreemptionHandler, job_signals
from dynlab.results import read_results, update_results
from dynlab.summary import print_summary
from dynlab.techniques.base import DynlabModule, Phase, PhaseContext, PhaseKind
from dynlab.validation import ConfigError, build_run, validate_config


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
    """W&B (offline unless WANDB_MODE says otherwise, and offline when its server cannot be
    reached), CSV, or nothing; one logger per phase."""
    run_dir = Path(cfg.run_dir)
    if cfg.logger.name == "none":
        return False
    if cfg.logger.name == "csv":
        return CSVLogger(save_dir=run_dir, name="csv", version=phase)
    import wandb

    # wandb's own banner lines stay off the console unless WANDB_SILENT=false asks for them; the
    # summary says where the offline run is and how to sync it.
    os.environ.setdefault("WANDB_SILENT", "true")
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
        mode=wandb_mode(cfg.logger.mode, run_dir),
        config=OmegaConf.to_container(cfg, resolve=True),
        # No history/summary dump at the end of a run: dynlab prints its own summary.
        settings=wandb.Settings(quiet=True),
    )


def build_trainer(
    cfg: DictConfig,
    phase: Phase,
    logger: Logger | bool,
    extra_callbacks: list[Callback],
    module: DynlabModule | None = None,
) -> pl.Trainer:
    """A Lightning trainer for one phase, checkpointing atomically into the phase's folder.

    The phase's recipe (from `module`) sets its epochs, trainer overrides, DDP options and EMA.
    """
    phase_dir = ckpt.phase_dir(cfg.run_dir, phase.name)
    kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    recipe = module.recipe(phase.name) if module is not None else PhaseRecipe()
    kwargs.update(recipe.trainer)
    epochs = module.phase_epochs(phase) if module is not None else phase.max_epochs
    if epochs is not None:
        kwargs["max_epochs"] = epochs
    if recipe.train_split == TrainSplit.whole or cfg.dataset.val_size == 0:
        kwargs["limit_val_batches"] = 0  # val is training data now (or there is none)
    if recipe.ddp and kwargs.get("strategy") == "ddp":
        kwargs["strategy"] = DDPStrategy(**recipe.ddp)
    if module is not None and cfg.channels_last:
        # Each phase: a phase may have replaced the model (a searched or converted network).
        module.to(memory_format=torch.channels_last)
    if module is not None and not module.automatic_optimization:
        # Lightning refuses gradient_clip_val under manual optimisation: manual_step clips.
        module.manual_clip_val = kwargs.pop("gradient_clip_val", None)
    callbacks: list[Callback] = [
        # Only the resume point: `last.ckpt` (monitor=None keeps the newest, under that name).
        ModelCheckpoint(
            dirpath=phase_dir,
            filename=ckpt.LAST.removesuffix(".ckpt"),
            enable_version_counter=False,
        ),
        ResumableLoaderCallback(),
        ckpt.RNGStateCallback(),
        *extra_callbacks,
    ]
    if recipe.ema is not None:
        callbacks.append(EMA(recipe.ema))
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
        # dynlab prints its own MACs and parameters at the end; Lightning's table counts no MACs.
        enable_model_summary=False,
    )


def evaluation_callbacks(cfg: DictConfig) -> list[Callback]:
    """The anytime, budgeted and latency evaluations the config switches on, and the technique's
    figures."""
    callbacks: list[Callback] = [TechniqueFigures(output_dir=cfg.run_dir)]
    if cfg.evaluation.anytime:
        callbacks.append(AnytimeEvaluation(output_dir=cfg.run_dir))
    if cfg.evaluation.budgeted:
        qs = list(cfg.evaluation.qs) if cfg.evaluation.qs is not None else None
        callbacks.append(BudgetedEvaluation(output_dir=cfg.run_dir, qs=qs))
    if cfg.evaluation.latency.enabled:  # last: it times the budgeted curve's thresholds
        settings = OmegaConf.to_object(cfg.evaluation.latency)  # the typed LatencyConfig
        callbacks.append(LatencyEvaluation(cfg.run_dir, settings))  # type: ignore[arg-type]
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


def schedule(module: DynlabModule, cfg: DictConfig) -> list[Phase]:
    """The technique's schedule for `cfg.mode`, or only the phase `cfg.phase` when it is set."""
    phases = module.phases(cfg.mode)
    if cfg.get("phase") is None:
        return phases
    chosen = [p for p in phases if p.name == cfg.phase]
    if not chosen:
        names = ", ".join(p.name for p in phases)
        raise ConfigError(f"phase={cfg.phase}: the {cfg.mode} schedule has the phases {names}")
    return chosen


def next_phase(module: DynlabModule, cfg: DictConfig) -> Phase | None:
    """The first phase of the schedule not finished yet (the schedule may grow as phases end)."""
    return next((p for p in schedule(module, cfg) if not ckpt.is_done(cfg.run_dir, p.name)), None)


def restore_finished_phases(module: DynlabModule, cfg: DictConfig) -> None:
    """On a rerun, load the outcome of the last finished phase before continuing the schedule;
    in a fresh run dir, the state of `ckpt_path` when one is given (a phase started from it).

    Loading it may grow the schedule (a finished search knows its retrain phases), so repeat until
    no later finished phase appears.
    """
    loaded: Phase | None = None
    while True:
        done = [p for p in schedule(module, cfg) if ckpt.is_done(cfg.run_dir, p.name)]
        if not done or done[-1] == loaded:
            break
        loaded = done[-1]
        ckpt.load_module_state(module, ckpt.phase_dir(cfg.run_dir, loaded.name) / ckpt.FINAL)
    if loaded is None and cfg.get("ckpt_path"):
        ckpt.load_module_state(module, cfg.ckpt_path)


@contextmanager
def phase_data(module: DynlabModule, datamodule: DynlabDataModule, phase: Phase) -> Iterator[None]:
    """The phase's training data for the length of the phase: its recipe's split (`train_split`)
    and extra train streams (`streams`)."""
    recipe = module.recipe(phase.name)
    specs = {
        name: StreamSpec(name=s.key or name, **{k: v for k, v in asdict(s).items() if k != "key"})
        for name, s in recipe.streams.items()
    }
    datamodule.set_train_split(recipe.train_split == TrainSplit.whole)
    datamodule.set_train_streams(specs or None)
    try:
        yield
    finally:
        datamodule.set_train_streams(None)
        datamodule.set_train_split(False)


def run_schedule(
    cfg: DictConfig, module: DynlabModule, datamodule: DynlabDataModule, callbacks: list[Callback]
) -> None:
    """Run every unfinished phase in order, each resuming from its own last checkpoint."""
    restore_finished_phases(module, cfg)
    while (phase := next_phase(module, cfg)) is not None:
        if _is_global_zero():
            update_results(cfg.run_dir, status="running", phase=phase.name)
        with timed_phase(cfg.run_dir, phase.name):
            run_phase(cfg, module, datamodule, callbacks, phase)
        if _is_global_zero():
            ckpt.mark_done(cfg.run_dir, phase.name)
        _barrier()


@contextmanager
def timed_phase(run_dir: str | Path, name: str) -> Iterator[None]:
    """Add the wall-clock seconds spent in phase `name` to results.json's `phase_seconds`, also
    when the phase is interrupted or preempted (a resumed phase's attempts add up)."""
    begin = time.monotonic()
    try:
        yield
    finally:
        if _is_global_zero():
            seconds = dict(read_results(run_dir).get("phase_seconds") or {})
            seconds[name] = round(seconds.get(name, 0.0) + time.monotonic() - begin, 3)
            update_results(run_dir, phase_seconds=seconds)


def run_phase(
    cfg: DictConfig,
    module: DynlabModule,
    datamodule: DynlabDataModule,
    callbacks: list[Callback],
    phase: Phase,
) -> None:
    """One phase: a custom phase's own loop, or a Lightning fit resuming its last checkpoint."""
    module.start_phase(phase)
    announce_phase(cfg, module, phase)
    pdir = ckpt.phase_dir(cfg.run_dir, phase.name)
    if phase.kind == PhaseKind.custom:
        logger = build_logger(cfg, phase.name)  # lazy: a W&B run only if the phase logs
        with finishing_logger(logger):
            loggers = [logger] if isinstance(logger, Logger) else []
            ctx = PhaseContext(Path(cfg.run_dir), pdir, datamodule, cfg, loggers)
            module.run_custom_phase(phase, ctx)
        if _is_global_zero():
            ckpt.save_module_state(module, pdir / ckpt.FINAL)
    else:
        logger = build_logger(cfg, phase.name)
        with finishing_logger(logger), phase_data(module, datamodule, phase):
            trainer = build_trainer(cfg, phase, logger, callbacks, module)
            resume = ckpt.resume_path(cfg.run_dir, phase.name)
            # The run's own checkpoint (it holds RNG states and config dataclasses, which
            # torch's weights-only unpickler refuses).
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=False)
            if trainer.interrupted:
                raise KeyboardInterrupt(f"phase '{phase.name}' was interrupted")
            trainer.save_checkpoint(pdir / ckpt.FINAL)


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
    quiet_console()
    validate_config(cfg)
    start_job_processes(cfg)  # dynlab.distributed: every phase, custom ones too, on every rank
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module = build_run(cfg)
    if _is_global_zero():
        update_results(cfg.run_dir, status="running", error=None, **run_identity(cfg))
    try:
        with job_signals():  # dynlab.preemption: a signal outside a fit waits for a safe point
            run_schedule(cfg, module, datamodule, [PreemptionHandler(), DivergenceGuard()])
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
            **module.deployed_cost(datamodule.info.input_size),
        )
        print_summary(results, cfg.run_dir)
    return metrics.get("test/top1")


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """What a report needs to place and trace a run: names, overrides, the resolved config and
    the provenance of this start (code, versions, threads, hardware, seed)."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return {
        "technique": cfg.technique.name,
        "backbone": cfg.backbone.name,
        "dataset": cfg.dataset.name,
        "overrides": overrides,
        "config": OmegaConf.to_container(cfg, resolve=True),
        **provenance.merged(read_results(cfg.run_dir), provenance.collect(cfg.seed)),
    }
