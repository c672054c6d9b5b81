"""What every technique's LightningModule shares: phase recipes, optimisation, metrics, state.

A technique subclasses `DynlabModule`, builds `self.model` (an object answering the dynamic-model
protocol in `dynlab.protocol`), and implements `exit_losses` or overrides `training_step`.
Schedules (GFNet's three stages, S2DNAS's search -> retrain, ...) are lists of `Phase`s that the
train app runs in order, each with its own checkpoint folder, resuming at the first unfinished one.
How a phase trains (optimisers, parameter groups, schedules, frozen parameters, trainer
overrides, extra data streams, EMA) is its `PhaseRecipe`, from `technique.phases.<name>`.
A technique with several optimisers in a step (FBNetV2, PPO) sets `automatic_optimization =
False` and calls `manual_step(name, loss)`; Lightning checkpoints the optimisers either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch.nn.functional as F
from omegaconf import OmegaConf
from pytorch_lightning.loggers import Logger
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from dynlab.backbones import create_backbone
from dynlab.config import (
    BackboneConfig,
    OptimConfig,
    PhaseRecipe,
    TechniqueConfig,
    check_recipe_phases,
)
from dynlab.data.base import DataInfo
from dynlab.optim import (
    NamedParams,
    build_optimizer,
    build_scheduler,
    lr_lambda,
    matches,
    select_parameters,
)
from dynlab.traits import no_schedule

__all__ = [
    "DynlabModule",
    "Phase",
    "PhaseContext",
    "PhaseKind",
    "build_optimizer",
    "dataset_backbone",
    "lr_lambda",
    "optimizer_steps_per_epoch",
]


class PhaseKind(StrEnum):
    fit = "fit"  # a Lightning `trainer.fit` over the datamodule
    custom = "custom"  # the technique's own loop (a search), run by `run_custom_phase`


@dataclass(frozen=True)
class Phase:
    """One step of a technique's schedule; `max_epochs=None` takes the trainer's setting."""

    name: str
    kind: PhaseKind = PhaseKind.fit
    max_epochs: int | None = None


@dataclass
class PhaseContext:
    """What a custom phase may use: where to write, the data, the run's config, and the phase's
    loggers (a W&B run of job type <phase> when the run logs to W&B; tables go there)."""

    run_dir: Path
    phase_dir: Path
    datamodule: pl.LightningDataModule
    cfg: Any
    loggers: list[Logger] = field(default_factory=list)


class PercentAccuracy(MulticlassAccuracy):
    """torchmetrics' multiclass accuracy in percent, as dynlab reports every accuracy."""

    def compute(self) -> Tensor:
        return super().compute() * 100.0


class DynlabModule(pl.LightningModule):
    """Base LightningModule: per-phase recipes, optimisers and schedules, exact top-k per exit."""

    # Every phase name the technique's schedules can hold: its config schema's PHASES.
    phase_names: tuple[str, ...] = TechniqueConfig.PHASES

    def __init__(self, config: TechniqueConfig, backbone: BackboneConfig | None = None) -> None:
        """`config` is the technique's typed config (its schema's object, so every default is
        the schema's); it and the backbone's (None: a model set by hand) are the checkpoints' and
        loggers' hyperparameters, as plain dicts."""
        super().__init__()
        self.config = config
        self.save_hyperparameters(
            {"technique": plain(config)} | ({"backbone": plain(backbone)} if backbone else {})
        )
        self.model: nn.Module
        self.current_phase: str | None = None
        self.recipes: dict[str, PhaseRecipe] = {}
        # Set by the runner under manual optimisation, where Lightning cannot clip for us.
        self.manual_clip_val: float | None = None
        self._optimizer_names: list[str] = []
        self._frozen: set[str] = set()
        # torchmetrics objects per split/exit, created at the first batch (exits and classes are
        # known then); their states are not persistent, so checkpoints do not depend on them.
        self.metrics = nn.ModuleDict()

    # --- the dynamic-model protocol, delegated to the technique's model -------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_exits(x)[-1]

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_exits(x)

    def exit_macs(self, input_size: tuple[int, int, int]) -> list[float]:
        return self.model.exit_macs(input_size)

    # --- deploy form: test metrics and evaluations run on the inference network ---------------
    def deploy(self) -> nn.Module:
        """The technique's inference network (`self.model.deploy()`): same exits, eval mode."""
        return self.model.deploy()

    def deployed_cost(self, input_size: tuple[int, int, int]) -> dict[str, Any]:
        """What results.json records of a model: the deploy form's parameters and exit MACs."""
        net = self.deploy()
        return {
            "params": sum(p.numel() for p in net.parameters()),
            "exit_macs": net.exit_macs(input_size),
        }

    def on_test_start(self) -> None:
        """Swap in the deploy form for the test loop and the evaluation callbacks."""
        self.__dict__["_training_form"] = self.model  # in __dict__: not registered as a submodule
        self.model = self.deploy()

    def on_test_end(self) -> None:
        """Back to the training form; Lightning runs the callbacks' on_test_end before this."""
        self.model = self.__dict__.pop("_training_form", self.model)

    # --- phases -------------------------------------------------------------------------------
    def phases(self, mode: str) -> list[Phase]:
        """The schedule for `mode` ("train" or "search"); may grow as earlier phases finish."""
        if mode != "train":
            raise ValueError(no_schedule(type(self).__name__, mode))
        return [Phase("train")]

    def set_recipes(self, recipes: dict[str, PhaseRecipe]) -> None:
        """The technique config's `phases` (the runner hands them over after building)."""
        check_recipe_phases(recipes, self.phase_names, type(self).__name__)
        self.recipes = dict(recipes)

    def recipe(self, phase: str | None = None) -> PhaseRecipe:
        """The recipe of `phase` (default: the current one): an exact key, else the first fnmatch
        pattern that matches (`retrain_*`), else the technique's defaults."""
        name = phase if phase is not None else self.current_phase
        if name is None:
            return PhaseRecipe()
        if name in self.recipes:
            return self.recipes[name]
        return next(
            (r for pattern, r in self.recipes.items() if fnmatchcase(name, pattern)), PhaseRecipe()
        )

    def phase_epochs(self, phase: Phase) -> int | None:
        """Epochs of a fit phase: the recipe's, else the phase's own, else the trainer's."""
        return self.recipe(phase.name).epochs or phase.max_epochs

    def check_run(self, cfg: Any) -> None:
        """Check the technique against the rest of the run's config (epochs, trainer) before
        anything trains; a ValueError is reported as one line. Nothing to check by default."""

    def start_phase(self, phase: Phase) -> None:
        """Called before a phase runs (also when it resumes): freeze parts, switch losses, ..."""
        self.current_phase = phase.name

    def run_custom_phase(self, phase: Phase, ctx: PhaseContext) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no custom phase '{phase.name}'")

    # --- technique state (masks, search results, controller) travels in every checkpoint -------
    def technique_state(self) -> dict[str, Any]:
        """State beyond parameters and buffers that must survive a checkpoint; {} by default."""
        return {}

    def load_technique_state(self, state: dict[str, Any]) -> None:
        """Restore `technique_state()`; called before the weights are loaded (may rebuild the model)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dynlab"] = {"phase": self.current_phase, "technique": self.technique_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("dynlab", {})
        self.current_phase = state.get("phase", self.current_phase)
        self.load_technique_state(state.get("technique", {}))

    # --- training -----------------------------------------------------------------------------
    def exit_losses(self, logits: list[Tensor], y: Tensor) -> Tensor:
        """Training loss from the exits' logits; the last exit's cross-entropy by default."""
        return F.cross_entropy(logits[-1], y, label_smoothing=self.config.optim.label_smoothing)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.model.forward_exits(x)
        loss = self.exit_losses(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        top1 = self._accuracy("train/top1", logits[-1].shape[1], k=1)
        top1(logits[-1], y)
        self._log_metric("train/top1", top1, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate_batch(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate_batch(batch, "test")

    def _evaluate_batch(self, batch: tuple[Tensor, Tensor], split: str) -> None:
        """Loss and top-1/top-5 of the last exit, plus top-1 of every exit.

        torchmetrics objects count correct samples and samples, summed over ranks at the epoch's
        end, so the logged accuracy is exact over the whole split however it is sharded.
        """
        x, y = batch
        logits = self.model.forward_exits(x)
        num_classes = logits[-1].shape[1]
        loss = self._metric(f"{split}/loss", MeanMetric)
        loss.update(F.cross_entropy(logits[-1], y), weight=y.numel())
        self._log_metric(f"{split}/loss", loss)
        for k in (1, 5) if num_classes >= 5 else (1,):
            name = f"{split}/top{k}"
            metric = self._accuracy(name, num_classes, k)
            metric.update(logits[-1], y)
            self._log_metric(name, metric, prog_bar=k == 1)
        if len(logits) > 1:
            for k, lk in enumerate(logits, start=1):
                name = f"{split}/top1_exit{k}"
                metric = self._accuracy(name, num_classes, k=1)
                metric.update(lk, y)
                self._log_metric(name, metric)

    def _metric(self, name: str, make: Callable[[], Metric]) -> Metric:
        """The metric object logged as `name`, made on first use on this module's device."""
        key = _metric_key(name)
        if key not in self.metrics:
            self.metrics[key] = make().to(self.device)
        return self.metrics[key]  # type: ignore[return-value]

    def _log_metric(self, name: str, metric: Metric, **kwargs: Any) -> None:
        """Log a metric object made after Lightning indexed the module's metric attributes."""
        self.log(name, metric, metric_attribute=f"metrics.{_metric_key(name)}", **kwargs)

    def _accuracy(self, name: str, num_classes: int, k: int) -> Metric:
        """Exact top-k accuracy in percent over every sample of the epoch, on all ranks."""
        return self._metric(
            name,
            lambda: PercentAccuracy(num_classes, top_k=k, average="micro", validate_args=False),
        )

    # --- optimisation -------------------------------------------------------------------------
    def trainable_parameters(self) -> NamedParams:
        """Parameters the current phase optimises (the recipe's `freeze` patterns are excluded;
        a technique may also freeze parts itself in `start_phase`)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def phase_optimizers(self) -> dict[str, OptimConfig]:
        """The current phase's named optimisers: its recipe's, else {"main": technique.optim}."""
        return dict(self.recipe().optimizers) or {"main": self.config.optim}

    def _apply_freeze(self) -> None:
        """Freeze what the current recipe says and release what the previous phase froze."""
        patterns = list(self.recipe().freeze)
        for name, p in self.named_parameters():
            if name in self._frozen and not matches(name, patterns):
                p.requires_grad_(True)
            elif matches(name, patterns):
                p.requires_grad_(False)
        self._frozen = {n for n, _ in self.named_parameters() if matches(n, patterns)}

    def configure_optimizers(self) -> Any:
        """One optimiser and per-step schedule for each of the phase's named optimisers.

        An optimiser with `params` patterns takes those parameters; the one without takes every
        trainable parameter left over. Several optimisers need manual optimisation.
        """
        self._apply_freeze()
        configs = self.phase_optimizers()
        if len(configs) > 1 and self.automatic_optimization:
            raise ValueError(
                f"phase '{self.current_phase}' names {len(configs)} optimisers "
                f"({', '.join(configs)}): {type(self).__name__} must use manual optimisation "
                "(automatic_optimization = False and manual_step) to step several"
            )
        assigned = assign_parameters(self.trainable_parameters(), configs)
        steps_per_epoch = optimizer_steps_per_epoch(self.trainer)
        total = self.trainer.max_steps
        if total is None or total < 0:
            total = steps_per_epoch * max(1, self.trainer.max_epochs or 1)
        self._optimizer_names = list(configs)
        result = []
        for name, o in configs.items():
            opt = build_optimizer(self, assigned[name], o)
            sched = build_scheduler(opt, o, total_steps=total, steps_per_epoch=steps_per_epoch)
            result.append(
                {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
            )
        return result[0] if len(result) == 1 else result

    def manual_step(self, name: str, loss: Tensor) -> None:
        """Under manual optimisation: one step of the phase's optimiser `name` on `loss` (zero
        grad, backward, clip at the trainer's gradient_clip_val, step, advance its schedule)."""
        index = self._optimizer_names.index(name)
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        if not isinstance(optimizers, list):
            optimizers, schedulers = [optimizers], [schedulers]
        opt = optimizers[index]
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.manual_clip_val:
            self.clip_gradients(opt, gradient_clip_val=self.manual_clip_val)
        opt.step()
        schedulers[index].step()  # type: ignore[union-attr]


def dataset_backbone(backbone: BackboneConfig, data_info: DataInfo) -> nn.Module:
    """An untrained `backbone` sized for the dataset: its classes and input channels."""
    return create_backbone(
        backbone.name,
        num_classes=data_info.num_classes,
        in_chans=data_info.input_size[0],
        **dict(backbone.kwargs),
    )


def plain(config: Any) -> dict[str, Any]:
    """A config dataclass as plain dicts, lists and scalars (enums by their names): what a
    checkpoint's hyperparameters hold, readable without dynlab's classes."""
    container = OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def _metric_key(name: str) -> str:
    return name.replace("/", "__")


def assign_parameters(
    named: NamedParams, configs: dict[str, OptimConfig]
) -> dict[str, NamedParams]:
    """Split `named` over the optimisers: each takes what its `params` patterns match (an
    earlier one wins), at most one without patterns takes the rest."""
    catch_all = [name for name, o in configs.items() if not o.params]
    if len(catch_all) > 1:
        raise ValueError(
            f"optimisers {', '.join(catch_all)} all lack `params` patterns: at most one may take "
            "the parameters the others leave"
        )
    assigned: dict[str, NamedParams] = {}
    taken: set[str] = set()
    for name, o in configs.items():
        if o.params:
            assigned[name] = [
                (n, p) for n, p in select_parameters(named, o.params) if n not in taken
            ]
            taken.update(n for n, _ in assigned[name])
    for name in catch_all:
        assigned[name] = [(n, p) for n, p in named if n not in taken]
    return assigned


def optimizer_steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimiser steps in one epoch, from the datamodule's train loader(s) on this rank.

    Not `trainer.estimated_stepping_batches`: in Lightning 2.6 it sets up the fit loop's train
    loader before a resume restores it, and the loader's saved position is then never applied.
    Several train streams are combined in max_size_cycle mode: the longest sets the epoch
    (`dynlab.data.base.StreamsLoader`).
    """
    batches = len(trainer.datamodule.train_dataloader())
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif limit is not None:
        batches = int(batches * limit)
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))
