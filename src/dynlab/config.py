"""Structured-config schemas and their registration in Hydra's ConfigStore.

Every config group file in `conf/` starts from one of these schemas (`defaults: [/schema/<group>/<name>@_here_]`),
so an unknown key or a wrong type fails at composition, before anything is built.
Checks that need more than types (backbone names, technique/backbone compatibility) live in
`validate_config`, which the apps call right after composition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class OptimizerName(StrEnum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class ScheduleName(StrEnum):
    cosine = "cosine"
    step = "step"
    # Linear decay to zero per iteration, as SPOS's official retraining script
    # (megvii-model/SinglePathOneShot, src/Evaluation/template/train.py: LambdaLR with
    # 1 - step / total_iters, then 0).
    linear = "linear"
    constant = "constant"


@dataclass
class ParamGroupConfig:
    """Parameters whose name matches `pattern` (fnmatch, e.g. `model.classifier.*`) get their own
    learning rate and/or weight decay; the first matching group wins."""

    pattern: str = MISSING
    lr: float | None = None
    weight_decay: float | None = None


@dataclass
class OptimConfig:
    """One optimiser with its learning-rate schedule (see `dynlab.optim`)."""

    name: OptimizerName = OptimizerName.sgd
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 5e-4
    # Norm weights and biases get no weight decay (Goyal et al. 2017, Sec. 5.1 practice).
    no_decay_norm_and_bias: bool = True
    # Which parameters this optimiser steps (fnmatch patterns on names; empty: every trainable
    # parameter no other optimiser of the phase claims).
    params: list[str] = field(default_factory=list)
    groups: list[ParamGroupConfig] = field(default_factory=list)
    schedule: ScheduleName = ScheduleName.cosine
    # Linear warm-up from lr/steps to lr over the first warmup_epochs (Goyal et al. 2017, Sec. 2.2).
    warmup_epochs: float = 0.0
    # Step schedule: decay by `gamma` at these fractions of the phase's steps (He et al.: 0.5, 0.75).
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    # The schedule advances once per epoch (GFNet's `adjust_learning_rate` in the official
    # utils.py sets the cosine lr at each epoch's start), not at every step.
    per_epoch: bool = False
    gamma: float = 0.1
    label_smoothing: float = 0.0


@dataclass
class StreamConfig:
    """An extra seeded subset of the train split a phase trains on (`dynlab.data.base.StreamSpec`)."""

    fraction: float | None = None
    size: int | None = None
    complement: bool = False
    # The subset's seed key; null: the stream's own name. Two streams with the same key, one with
    # complement=true, are disjoint halves of one split (FBNetV2's 80 % weights / 20 % arch).
    key: str | None = None
    augment: bool = True
    shuffle: bool = True
    sharded: bool = True
    batch_size: int | None = None


@dataclass
class EMAConfig:
    """An exponential moving average of the weights (Lightning's EMAWeightAveraging) whose
    average replaces the weights at the end of the phase and is what validation sees."""

    decay: float = 0.9998
    # Buffers copied from the live model instead of averaged (binary pruning masks); buffers that
    # are not floating point are always copied.
    copy_buffers: list[str] = field(default_factory=lambda: ["*mask*"])


@dataclass
class PhaseRecipe:
    """How one phase of a technique's schedule trains, all from config (`technique.phases.<name>`).

    Unset fields fall back to the technique's defaults: `optim` for a single optimiser, the
    trainer's max_epochs, the trainer config as it is.
    """

    epochs: int | None = None
    # Named optimisers of the phase (several only with manual optimisation, e.g. FBNetV2's
    # weights and architecture); empty: {"main": technique.optim}.
    optimizers: dict[str, OptimConfig] = field(default_factory=dict)
    # Parameters frozen (requires_grad=False) during the phase, by fnmatch pattern.
    freeze: list[str] = field(default_factory=list)
    # Trainer keyword overrides for this phase (e.g. gradient_clip_val, precision).
    trainer: dict[str, Any] = field(default_factory=dict)
    # DDPStrategy keyword arguments when the trainer runs DDP (SPOS's supernet:
    # {find_unused_parameters: true}, since one path leaves the other choices without gradients).
    ddp: dict[str, Any] = field(default_factory=dict)
    # Extra train streams: the phase's train loader becomes {name: loader} (Lightning combines them).
    streams: dict[str, StreamConfig] = field(default_factory=dict)
    ema: EMAConfig | None = None


@dataclass
class BackboneConfig:
    """Any timm model name or a dynlab CIFAR backbone (`dynlab.backbones.list_backbones()`)."""

    name: str = MISSING
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TechniqueConfig:
    """Fields every technique has; each technique extends it with its own schema."""

    # Every phase name the technique's schedules can hold (fnmatch patterns for numbered ones);
    # its module's `phase_names`. A recipe for a misspelt phase is refused, not silently unused.
    PHASES: ClassVar[tuple[str, ...]] = ("train",)

    _target_: str = MISSING
    name: str = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Per-phase recipes keyed by phase name or fnmatch pattern (`retrain_*`); handed to the
    # module by the runner, not a constructor argument.
    phases: dict[str, PhaseRecipe] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_recipe_phases(self.phases, self.PHASES, self.name)


def check_recipe_phases(recipes: Any, phase_names: tuple[str, ...], technique: str) -> None:
    """Every recipe key names (or matches) a phase the technique can have."""
    for key in recipes:
        if not any(fnmatchcase(n, key) or fnmatchcase(key, n) for n in phase_names):
            raise ValueError(
                f"technique.phases.{key}: {technique} has no such phase "
                f"(its phases: {', '.join(phase_names)})"
            )


@dataclass
class DatasetConfig:
    """Fields every dataset has; the datamodule's own schema adds the rest."""

    _target_: str = MISSING
    name: str = MISSING
    root: str | None = None
    batch_size: int = 128
    eval_batch_size: int | None = None
    num_workers: int = 0
    val_size: int = 5000
    seed: int = "${seed}"  # type: ignore[assignment]
    augment: bool = True


@dataclass
class SyntheticConfig(DatasetConfig):
    _target_: str = "dynlab.data.synthetic.SyntheticDataModule"
    name: str = "synthetic"
    num_train: int = 2048
    num_test: int = 512
    num_classes: int = 10
    image_size: int = 32
    channels: int = 3
    val_size: int = 256


@dataclass
class DigitsConfig(DatasetConfig):
    _target_: str = "dynlab.data.digits.DigitsDataModule"
    name: str = "digits"
    val_size: int = 200
    channels: int = 3


@dataclass
class ClutteredDigitsConfig(DatasetConfig):
    """Digits placed at random on a larger canvas among fragments of other digits (RAM-style)."""

    _target_: str = "dynlab.data.cluttered_digits.ClutteredDigitsDataModule"
    name: str = "cluttered_digits"
    canvas_size: int = 64
    digit_size: int = 24
    clutter: int = 4
    fragment_size: int = 8
    channels: int = 3
    val_size: int = 200

    def __post_init__(self) -> None:
        problem = self.range_problem(
            self.canvas_size, self.digit_size, self.fragment_size, self.clutter, self.channels
        )
        if problem:
            raise ValueError(problem)

    @staticmethod
    def range_problem(
        canvas_size: int, digit_size: int, fragment_size: int, clutter: int, channels: int
    ) -> str | None:
        """What is wrong with these sizes, or None (the datamodule runs the same check)."""
        if channels not in (1, 3):
            return f"cluttered_digits: channels must be 1 or 3, got {channels}"
        if not 8 <= digit_size <= canvas_size:
            return (
                f"cluttered_digits: digit_size must be in [8, canvas_size={canvas_size}], "
                f"got digit_size={digit_size}"
            )
        if not 1 <= fragment_size <= digit_size:
            return (
                f"cluttered_digits: fragment_size must be in [1, digit_size={digit_size}], "
                f"got fragment_size={fragment_size}"
            )
        if clutter < 0:
            return f"cluttered_digits: clutter must be >= 0 fragments, got clutter={clutter}"
        return None


@dataclass
class CIFAR10Config(DatasetConfig):
    _target_: str = "dynlab.data.cifar.CIFAR10DataModule"
    name: str = "cifar10"
    root: str | None = "${oc.env:DYNLAB_DATA,data}"


@dataclass
class CIFAR100Config(CIFAR10Config):
    _target_: str = "dynlab.data.cifar.CIFAR100DataModule"
    name: str = "cifar100"


@dataclass
class ImageNetConfig(DatasetConfig):
    _target_: str = "dynlab.data.imagenet.ImageNetDataModule"
    name: str = "imagenet"
    root: str | None = "${oc.env:DYNLAB_DATA,data}/imagenet"
    val_size: int = 50000
    batch_size: int = 256
    num_workers: int = 8
    num_classes: int = 1000
    image_size: int = 224


@dataclass
class TrainerConfig:
    """Keyword arguments of `pytorch_lightning.Trainer` (the ones dynlab users set; extend as needed)."""

    accelerator: str = "cpu"
    devices: Any = 1
    strategy: Any = "auto"
    num_nodes: int = 1
    precision: Any = "32-true"
    max_epochs: int = 10
    max_steps: int = -1
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int = 0
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1
    deterministic: Any = False
    benchmark: bool | None = None
    enable_progress_bar: bool = True


class LoggerName(StrEnum):
    wandb = "wandb"
    csv = "csv"
    none = "none"


@dataclass
class LoggerConfig:
    """Where metrics go. W&B is offline unless WANDB_MODE says otherwise (`wandb sync` later)."""

    name: LoggerName = LoggerName.wandb
    project: str = "dynlab"
    entity: str | None = None
    mode: str = "${oc.env:WANDB_MODE,offline}"
    # Jobs of one sweep share a group; a single run gets its own (the run dir's name).
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class EvaluationConfig:
    """The two dynamic-inference evaluations, run at the end of a schedule and by dynlab-evaluate."""

    anytime: bool = True
    budgeted: bool = True
    # MSDNet's released code sweeps the geometric exit law q over 0.05..1.95 (39 levels).
    qs: list[float] | None = None


@dataclass
class Config:
    backbone: BackboneConfig = MISSING
    technique: Any = MISSING
    dataset: Any = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    seed: int = 0
    # "train" runs the technique's training schedule; "search" (dynlab-search) its search schedule.
    mode: str = "train"
    run_dir: str = "${hydra:runtime.output_dir}"
    # dynlab-evaluate: the checkpoint to evaluate; dynlab-train/-search: the state a fresh run
    # starts from (weights and technique state, e.g. a finished search's), ignored on a resume.
    ckpt_path: str | None = None
    # Run only this phase of the schedule (with ckpt_path: one phase alone from a checkpoint).
    phase: str | None = None
    # Presets (+experiment=...) record what the paper reports and where it comes from.
    expected: Any = None


SCHEMAS: dict[str, dict[str, Any]] = {
    "technique": {},
    "dataset": {
        "synthetic": SyntheticConfig,
        "digits": DigitsConfig,
        "cluttered_digits": ClutteredDigitsConfig,
        "cifar10": CIFAR10Config,
        "cifar100": CIFAR100Config,
        "imagenet": ImageNetConfig,
    },
    "backbone": {"backbone": BackboneConfig},
    "trainer": {"trainer": TrainerConfig},
    "logger": {"logger": LoggerConfig},
}


def register_schema(group: str, name: str, node: type) -> None:
    """Add a schema (for example a technique's) so `conf/<group>/*.yaml` can extend it."""
    SCHEMAS.setdefault(group, {})[name] = node


def gpus_per_node(accelerator: str, devices: int) -> int | None:
    """Slurm GPUs per node for a Lightning trainer: one per device on GPU trainers, none on CPU."""
    return devices if accelerator in ("gpu", "cuda") else None


def share(epochs: int, fraction: float) -> int:
    """`fraction` of an epoch budget, rounded, at least 1: a multi-phase technique's phase epochs
    under a budget shared with single-phase ones (`${dynlab.share:${trainer.max_epochs},0.5}`)."""
    return max(1, round(int(epochs) * float(fraction)))


def register_configs() -> None:
    """Store every schema under `schema/<group>/<name>` and the root schema as `config_schema`,
    and the resolvers the config files use."""
    OmegaConf.register_new_resolver("dynlab.gpus_per_node", gpus_per_node, replace=True)
    OmegaConf.register_new_resolver("dynlab.share", share, replace=True)
    _import_technique_schemas()
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, nodes in SCHEMAS.items():
        for name, node in nodes.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def _import_technique_schemas() -> None:
    """Techniques register their schemas on import (each package's `config.py`)."""
    import importlib
    import pkgutil

    import dynlab.techniques as techniques

    for info in pkgutil.iter_modules(techniques.__path__):
        if info.ispkg:
            try:
                importlib.import_module(f"dynlab.techniques.{info.name}.config")
            except ModuleNotFoundError as err:
                if err.name != f"dynlab.techniques.{info.name}.config":
                    raise
