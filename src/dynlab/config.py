"""Structured-config schemas and their registration in Hydra's ConfigStore.

Every config group file in `dynlab/conf/` starts from one of these schemas (`defaults: [/schema/<group>/<name>@_here_]`),
so an unknown key or a wrong type fails at composition, before anything is built. A schema's
`__post_init__` holds its range rules, run by `validate_config` (a rule one setting breaks raises
`SettingError`, reported under its full key). What techniques need of their backbones lives in
`traits.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from dynlab.dataset_config import (
    CIFAR10Config,
    CIFAR100Config,
    ClutteredDigitsConfig,
    DigitsConfig,
    FashionMNISTConfig,
    ImageNetConfig,
    SyntheticConfig,
)
from dynlab.dataset_config import DatasetConfig as DatasetConfig  # user schemas extend it
from dynlab.schema_checks import SettingError as SettingError
from dynlab.schema_checks import at_least as _at_least


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


class CandidatesOn(StrEnum):
    """Where a search's candidates are scored (dynlab.search.driver)."""

    auto = "auto"  # one Slurm array a round under hydra/launcher=slurm with one rank, else ranks
    array = "array"  # one Slurm job array a round (dynlab.search.array)
    ranks = "ranks"  # in this job, spread over its DDP ranks (one process: in process)


@dataclass
class ParamGroupConfig:
    """Parameters whose name matches `pattern` (fnmatch, e.g. `model.classifier.*`) get their own
    learning rate and/or weight decay; the first matching group wins."""

    pattern: str = MISSING
    lr: float | None = None
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        _at_least({"lr": self.lr, "weight_decay": self.weight_decay}, 0)


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

    def __post_init__(self) -> None:
        """torch's own checks, and the ones torch lacks (a milestone given in epochs), at
        validation instead of a traceback when the optimiser is built."""
        _at_least({"lr": self.lr, "weight_decay": self.weight_decay}, 0)
        _at_least({"warmup_epochs": self.warmup_epochs}, 0)
        if not 0 <= self.momentum < 1:
            raise SettingError("momentum", self.momentum, "must be in [0, 1), e.g. 0.9")
        if self.name == OptimizerName.sgd and self.nesterov and self.momentum == 0:
            raise SettingError(
                "momentum", 0, "Nesterov SGD needs momentum > 0, e.g. 0.9 (or nesterov=false)"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SettingError("betas", list(self.betas), "two numbers in [0, 1), e.g. [0.9,0.999]")
        if not all(0 <= m <= 1 for m in self.milestones):
            raise SettingError(
                "milestones",
                list(self.milestones),
                "fractions of the phase's steps in [0, 1] (e.g. [0.5,0.75]), not epochs",
            )
        if self.gamma <= 0:
            raise SettingError("gamma", self.gamma, "the step decay factor must be > 0, e.g. 0.1")
        if not 0 <= self.label_smoothing < 1:
            raise SettingError("label_smoothing", self.label_smoothing, "must be in [0, 1)")


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

    def __post_init__(self) -> None:
        if not 0 <= self.decay <= 1:
            raise SettingError("decay", self.decay, "must be in [0, 1], e.g. 0.9998")


class TrainSplit(StrEnum):
    """What a phase trains on: the training split less the held-out val (searches, calibrated
    exits), or all of it (a final retrain or a static run, as the papers do)."""

    held_out = "held_out"
    whole = "whole"


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
    # `whole`: the phase trains on the held-out val too (and validates on nothing, val being
    # training data then); searches and threshold calibration still read the held-out split.
    train_split: TrainSplit = TrainSplit.held_out

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise SettingError(
                "epochs", self.epochs, "a phase trains 1 epoch or more (unset: trainer.max_epochs)"
            )
        check_run_length(self.trainer, prefix="trainer.")


def check_run_length(trainer: Mapping[str, Any], prefix: str = "") -> None:
    """Trainer settings (`trainer` or a recipe's overrides) that leave a phase at least one step:
    with none, Lightning ends at once and the run reports chance-level accuracy as completed."""
    for key in ("max_epochs", "max_steps"):
        value = trainer.get(key)
        if value is not None and (value == 0 or value < -1):
            raise SettingError(
                prefix + key, value, "trains nothing: set 1 or more (or -1 for no limit)"
            )
    limit = trainer.get("limit_train_batches")
    if isinstance(limit, int | float) and (limit <= 0 or (isinstance(limit, float) and limit > 1)):
        raise SettingError(
            prefix + "limit_train_batches",
            limit,
            "give a batch count >= 1, a fraction in (0, 1], or null for every batch",
        )


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
    # What the technique reads the held-out val split for, by mode (`train`, `search`): a run
    # with dataset.val_size=0 is refused in that mode before anything trains.
    HELD_OUT_USES: ClassVar[dict[str, str]] = {}
    # Several exits whose thresholds the budgeted evaluation calibrates on the held-out split
    # (which then must exist, and must not have been trained on).
    CALIBRATED_EXITS: ClassVar[bool] = False
    # Older field names -> their names now: a run that sets an older one gets a one-line note
    # (validation's `note_deprecated`) and the value moves to the new field.
    DEPRECATED: ClassVar[dict[str, str]] = {}

    _target_: str = MISSING
    name: str = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Per-phase recipes keyed by phase name or fnmatch pattern (`retrain_*`); handed to the
    # module by the runner, not a constructor argument.
    phases: dict[str, PhaseRecipe] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_recipe_phases(self.phases, self.PHASES, self.name)
        for old, new in self.DEPRECATED.items():
            value = getattr(self, old)
            if value is None:
                continue
            if getattr(self, new) is not None:
                raise ValueError(
                    f"{self.name}: give technique.{new} only (technique.{old} is its older name)"
                )
            setattr(self, new, value)
            setattr(self, old, None)


def check_recipe_phases(recipes: Any, phase_names: tuple[str, ...], technique: str) -> None:
    """Every recipe key names (or matches) a phase the technique can have."""
    for key in recipes:
        if not any(fnmatchcase(n, key) or fnmatchcase(key, n) for n in phase_names):
            raise ValueError(
                f"technique.phases.{key}: {technique} has no such phase "
                f"(its phases: {', '.join(phase_names)})"
            )


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
    # BatchNorm statistics over all DDP processes (small per-GPU batches); off as in Lightning.
    sync_batchnorm: bool = False

    def __post_init__(self) -> None:
        check_run_length(vars(self))
        _at_least({"num_nodes": self.num_nodes}, 1)
        _at_least({"accumulate_grad_batches": self.accumulate_grad_batches}, 1)
        _at_least({"gradient_clip_val": self.gradient_clip_val}, 0)


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
class LatencyConfig:
    """Measured time of the deploy form at the end of a run (dynlab.evaluation.latency): each
    exit's milliseconds per image in PyTorch and, on the run's ONNX export, in ONNX Runtime, and
    the budgeted curve's milliseconds axis."""

    # On by default; DYNLAB_LATENCY=false turns it off where a run's minutes matter more than its
    # timings (the test suite sets it; its own latency tests switch it back on).
    enabled: bool = "${oc.decode:${oc.env:DYNLAB_LATENCY,true}}"  # type: ignore[assignment]
    # Export the deploy form to <run dir>/export (one ONNX graph per exit) and time it as well.
    onnx: bool = True
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    # Test images a timed pass runs over (at least the largest batch size; partial batches dropped).
    images: int = 128
    warmup: int = 2  # untimed passes first
    repeats: int = 7  # timed passes: the median is reported, with the p10..p90 spread
    threads: int | None = None  # intra-op threads of both runtimes (None: torch's own setting)
    # The budgeted curve's ms axis: real early exit under each level's thresholds at this batch
    # size (0: none), timed `budget_repeats` times.
    budget_batch: int = 64
    budget_repeats: int = 3
    # The export's parity: max abs logit difference over the logits' scale, at every exit.
    parity_tolerance: float = 1e-4

    def __post_init__(self) -> None:
        _at_least({"images": self.images, "repeats": self.repeats, "threads": self.threads}, 1)
        _at_least({"warmup": self.warmup, "budget_batch": self.budget_batch}, 0)
        _at_least({"budget_repeats": self.budget_repeats}, 1)
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise SettingError(
                "batch_sizes", list(self.batch_sizes), "positive batch sizes, e.g. [1,64]"
            )
        largest = max(*self.batch_sizes, self.budget_batch)
        if self.images < largest:
            raise SettingError(
                "images", self.images, f"a timed pass needs at least one batch of {largest} images"
            )


@dataclass
class EvaluationConfig:
    """The dynamic-inference evaluations, run at the end of a schedule and by dynlab-evaluate."""

    anytime: bool = True
    budgeted: bool = True
    # MSDNet's PyTorch code (kalviny/MSDNet-PyTorch adaptive_inference.py) sweeps the geometric
    # exit law q over 0.05..1.95 (39 levels).
    qs: list[float] | None = None
    latency: LatencyConfig = field(default_factory=LatencyConfig)


@dataclass
class Config:
    backbone: BackboneConfig = MISSING
    technique: Any = MISSING
    dataset: Any = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    seed: int = 0
    # Train with conv weights (hence activations) in channels-last memory order: the same maths in
    # another summation order, 1.30x the CPU training speed of ResNet-20 (benchmarks/throughput.py
    # --compare-channels-last). Off by default: results move within float rounding, and a tiny
    # SFR run on digits (tests/test_sfr.py) ended well below its channels-first accuracy.
    channels_last: bool = False
    # "train" runs the technique's training schedule; "search" (dynlab-search) its search schedule;
    # "rank" (dynlab-rank) trains a supernet and measures how well it ranks architectures.
    mode: str = "train"
    run_dir: str = "${hydra:runtime.output_dir}"
    # dynlab-evaluate: the checkpoint to evaluate; dynlab-train/-search: the state a fresh run
    # starts from (weights and technique state, e.g. a finished search's), ignored on a resume.
    ckpt_path: str | None = None
    # dynlab-export: where the ONNX graphs and manifest go; dynlab-evaluate: the export to run.
    export_dir: str | None = None
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
        "fashion_mnist": FashionMNISTConfig,
        "imagenet": ImageNetConfig,
    },
    "backbone": {"backbone": BackboneConfig},
    "trainer": {"trainer": TrainerConfig},
    "logger": {"logger": LoggerConfig},
}


def register_schema(group: str, name: str, node: type) -> None:
    """Add a schema (for example a technique's) so `dynlab/conf/<group>/*.yaml` can extend it."""
    SCHEMAS.setdefault(group, {})[name] = node


def gpus_per_node(accelerator: str, devices: int) -> int | None:
    """Slurm GPUs per node for a Lightning trainer: one per device on GPU trainers, none on CPU."""
    return devices if accelerator in ("gpu", "cuda") else None


def share(epochs: int, fraction: float) -> int:
    """`fraction` of an epoch budget, rounded, at least 1: a multi-phase technique's phase epochs
    under a budget shared with single-phase ones (`${dynlab.share:${trainer.max_epochs},0.5}`)."""
    return max(1, round(int(epochs) * float(fraction)))


def times(value: float, factor: float) -> float:
    """`value` x `factor`: a bound that follows another one (`${dynlab.times:${...max_mmacs},0.9}`)."""
    return float(value) * float(factor)


def register_configs() -> None:
    """Store every schema under `schema/<group>/<name>` and the root schema as `config_schema`,
    and the resolvers the config files use."""
    OmegaConf.register_new_resolver("dynlab.gpus_per_node", gpus_per_node, replace=True)
    OmegaConf.register_new_resolver("dynlab.share", share, replace=True)
    OmegaConf.register_new_resolver("dynlab.times", times, replace=True)
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
