"""Checks that a composed config can work, cheapest first, each failing with one clear line.

Hydra's structured configs already reject a misspelt key or a wrong type at composition. Then:
1. `validate_config` (light: no torch) checks combinations, the schemas' own `__post_init__`
   rules, the technique's schedule for the app's mode and `phase=`, then the backbone (imports
   timm and dynlab's backbones, so last): its name exists, and it declares the capability the
   technique needs (`traits.TECHNIQUE_TRAITS`). The apps call `validate_run`: the same with what
   the run needs of this machine (sbatch for `hydra/launcher=slurm`, the data root, `ckpt_path`)
   before the backbone, so only the backbone's errors wait for timm and torch to load;
2. `build_run` builds the datamodule, runs one zero image of the dataset's size through the bare
   backbone (a model that cannot take it fails here, saying what to set), then builds the
   technique's module and asks it to check the rest of the run (`check_run`: e.g. enough epochs for
   its schedule), turning a `ValueError` (a setting or backbone the technique cannot use) into a
   `ConfigError`.
`checkpoint_problem` tells a readable checkpoint from a missing, truncated or foreign file
without torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import Container, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dynlab.capabilities import declared_backbones
from dynlab.config import SettingError, TechniqueConfig
from dynlab.errors import CheckpointError, ConfigError, UserError, full_error, require_data_root
from dynlab.traits import backbone_needed, no_schedule, technique_traits

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from dynlab.data.base import DataInfo, DynlabDataModule
    from dynlab.techniques.base import DynlabModule

# Groups whose schemas may check their values in `__post_init__` (run by `OmegaConf.to_object`).
SCHEMA_GROUPS = ("backbone", "technique", "dataset", "trainer", "logger", "evaluation")
# hydra-submitit-launcher's Slurm launcher (`hydra/launcher=slurm`) and how to get a Slurm here.
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
LOCAL_SLURM = "slurm/local-cluster.sh start starts a one-node cluster here (as root)"
# Where a run dir marks a finished phase (dynlab.checkpointing: checkpoints/<phase>/done).
DONE_MARKERS = "checkpoints/*/done"


def validate_config(cfg: DictConfig) -> None:
    """Checks beyond the schemas' types: names that must exist and settings that must agree
    (a preset validates on any machine: no data or checkpoint needed)."""
    check_config(cfg)
    check_backbone(cfg)


def validate_run(cfg: DictConfig) -> None:
    """`validate_config` plus what this run needs of the machine, checked before the backbone
    (which loads timm): what the apps call before importing the runner."""
    check_config(cfg)
    check_machine(cfg)
    check_backbone(cfg)


def check_config(cfg: DictConfig) -> None:
    """The config's own light checks (no torch), cheapest first."""
    check_devices(cfg)
    check_schema_rules(cfg)
    note_deprecated(cfg)
    check_schedule(cfg)
    check_pairing(cfg)
    check_held_out(cfg)


def check_machine(cfg: DictConfig) -> None:
    """What a run needs of this machine, cheap: sbatch, the data root, the start checkpoint."""
    check_launcher(cfg)
    check_data_root(cfg)
    check_start_checkpoint(cfg)


def check_devices(cfg: DictConfig) -> None:
    """Several CPU processes need a DDP strategy (Lightning would silently run one)."""
    devices, strategy = cfg.trainer.devices, cfg.trainer.strategy
    multi_cpu = cfg.trainer.accelerator == "cpu" and isinstance(devices, int) and devices > 1
    if multi_cpu and strategy in ("auto", None):
        raise ConfigError(
            f"trainer.devices={devices} on CPU needs a DDP strategy: use trainer=ddp_cpu "
            "(or trainer.strategy=ddp)"
        )


def note_deprecated(cfg: DictConfig) -> None:
    """One line for each deprecated setting the run uses (it still works under its new name)."""
    for old, new in technique_schema(cfg).DEPRECATED.items():
        if cfg.technique.get(old) is not None:
            log.warning(
                f"technique.{old} is deprecated: it still works, as technique.{new}; write that "
                "instead"
            )


def check_schema_rules(cfg: DictConfig) -> None:
    """Build each group's schema object, so its `__post_init__` range checks run now (cheap); a
    `SettingError` is reported under its full key (`technique.optim.lr=-1.0: ...`)."""
    for group in SCHEMA_GROUPS:
        node = cfg.get(group)
        if not OmegaConf.is_config(node) or OmegaConf.get_type(node) in (dict, None):
            continue
        try:
            OmegaConf.to_object(node)
        except SettingError as err:
            where = _failing_node(node, group)
            raise ConfigError(f"{where}.{err.key}={err.value}: {err.rule}") from err
        except (ValueError, OmegaConfBaseException) as err:
            raise ConfigError(f"{group}: {_first_line(err)}") from err


def _failing_node(node: Container, key: str) -> str:
    """The full key of the innermost node under `node` (at `key`) whose schema rules fail."""
    children = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    for child_key in children:
        child = node[child_key]
        if OmegaConf.is_config(child):
            try:
                OmegaConf.to_object(child)
            except ValueError:
                return _failing_node(child, f"{key}.{child_key}")
    return key


def check_held_out(cfg: DictConfig) -> None:
    """A technique that reads the held-out split (a search, calibrated exits) has one, and has not
    trained on it (a recipe's `train_split: whole`)."""
    schema = technique_schema(cfg)
    uses = dict(schema.HELD_OUT_USES)
    if schema.CALIBRATED_EXITS and cfg.evaluation.budgeted:
        uses.setdefault(cfg.mode, "the budgeted evaluation calibrates its exit thresholds on it")
    use = uses.get(cfg.mode)
    if use is None:
        return
    technique = cfg.technique.name
    if cfg.dataset.val_size == 0:
        raise ConfigError(
            f"dataset.val_size=0 holds nothing out, but {technique} needs the held-out split: "
            f"{use}; set dataset.val_size to 1 or more (e.g. 5000)"
        )
    whole = [name for name, r in cfg.technique.phases.items() if r.get("train_split") == "whole"]
    if whole and schema.CALIBRATED_EXITS and cfg.evaluation.budgeted:
        raise ConfigError(
            f"technique.phases.{whole[0]}.train_split=whole trains on the held-out split, but "
            f"{technique} calibrates its exit thresholds on it: keep held_out, or set "
            "evaluation.budgeted=false"
        )


def technique_schema(cfg: DictConfig) -> type[TechniqueConfig]:
    """The technique's schema class (TechniqueConfig for a plain node)."""
    schema = OmegaConf.get_type(cfg.technique)
    is_technique = isinstance(schema, type) and issubclass(schema, TechniqueConfig)
    return schema if is_technique else TechniqueConfig  # type: ignore[return-value]


def check_schedule(cfg: DictConfig) -> None:
    """The technique has a schedule for the app's mode (dynlab-search: a search), and `phase=`
    names one of its phases (its schema's PHASES, fnmatch patterns for numbered ones)."""
    technique = cfg.technique.name
    problem = no_schedule(technique, cfg.mode)
    if problem:
        raise ConfigError(problem)
    if cfg.get("phase") is None:
        return
    phases = technique_schema(cfg).PHASES
    if not any(fnmatchcase(str(cfg.phase), pattern) for pattern in phases):
        numbered = " (* stands for a number)" if any("*" in p for p in phases) else ""
        raise ConfigError(
            f"phase={cfg.phase}: technique={technique} has no such phase; its phases: "
            f"{', '.join(phases)}{numbered}"
        )


def check_launcher(cfg: DictConfig) -> None:
    """`hydra/launcher=slurm` needs Slurm's sbatch (a search sends its candidates as job arrays):
    refused here, not in sbatch's traceback later. Jobs that Slurm started are not asked."""
    if not HydraConfig.initialized() or "SLURM_JOB_ID" in os.environ:
        return
    hydra_cfg = HydraConfig.get()
    launcher = hydra_cfg.get("launcher") or {}
    if launcher.get("_target_") != SLURM_LAUNCHER or hydra_cfg.mode == RunMode.MULTIRUN:
        return
    if shutil.which("sbatch") is None:
        raise ConfigError(slurm_problem())


def slurm_problem(failure: str | None = None) -> str:
    """What to say when `hydra/launcher=slurm` cannot submit: no sbatch here, or sbatch's own
    complaint (`failure`, e.g. no controller answering)."""
    if shutil.which("sbatch") is None:
        return (
            "hydra/launcher=slurm: sbatch was not found, so this machine cannot submit to Slurm; "
            f"{LOCAL_SLURM}, or leave out hydra/launcher=slurm to run here"
        )
    return (
        f"hydra/launcher=slurm: sbatch failed: {failure}. Is a Slurm controller running? "
        f"{LOCAL_SLURM} (then export SLURM_CONF as it prints)"
    )


def check_data_root(cfg: DictConfig) -> None:
    """A dataset read from files has its root folder (its schema's LAYOUT says what goes there)."""
    layout = getattr(OmegaConf.get_type(cfg.dataset), "LAYOUT", None)
    if layout is not None:
        require_data_root(cfg.dataset.name, cfg.dataset.root, layout)


def check_start_checkpoint(cfg: DictConfig) -> None:
    """`ckpt_path` is a readable checkpoint, unless the run dir finished a phase of its own (then
    the run resumes from that and ignores it)."""
    path = cfg.get("ckpt_path")
    if not path or any(Path(cfg.run_dir).glob(DONE_MARKERS)):
        return
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"ckpt_path={path}: {problem}")


def check_pairing(cfg: DictConfig) -> None:
    """One of dynlab's backbones has the capability the technique needs, as its source declares
    it (torch-free, so a wrong pairing is refused in about a second; `check_backbone` judges
    other registered models once timm has loaded)."""
    name, technique = cfg.backbone.name, cfg.technique.name
    needs, declared = technique_traits(technique).needs, declared_backbones()
    if needs is not None and name in declared and needs not in declared[name]:
        raise ConfigError(backbone_needed(technique, name))


def check_backbone(cfg: DictConfig) -> None:
    """The backbone exists in dynlab's or timm's registry, and has the capability the technique
    needs as the backbone declares it (no model built; imports timm and dynlab's backbones, so it
    comes last). A model registered without declarations (a user's supernet, a timm name) is
    judged by the technique's module on the built network."""
    from dynlab.backbones import (
        UnknownBackboneError,
        backbone_capabilities,
        is_known_backbone,
        list_backbones,
    )

    name, technique = cfg.backbone.name, cfg.technique.name
    if not is_known_backbone(name):
        raise UnknownBackboneError(name)
    needs = technique_traits(technique).needs
    declared = name in list_backbones()
    if needs is not None and declared and needs not in backbone_capabilities(name):
        registered = {n: backbone_capabilities(n) for n in list_backbones()}
        raise ConfigError(backbone_needed(technique, name, registered))


@contextmanager
def constructor_errors(what: str) -> Iterator[None]:
    """A constructor's `ValueError` is a setting it cannot use: report it as a `ConfigError`.

    `HYDRA_FULL_ERROR=1` keeps the original exception (and its traceback) for debugging.
    """
    try:
        yield
    except UserError:
        raise
    except ValueError as err:
        if full_error():
            raise
        raise ConfigError(f"{what}: {_first_line(err)}") from err


def build_run(cfg: DictConfig) -> tuple[DynlabDataModule, DynlabModule]:
    """The datamodule and the technique's module, with the backbone checked on the dataset's
    input size before the technique transforms it."""
    from dynlab.building import build_datamodule, build_module

    with constructor_errors(f"dataset={cfg.dataset.name}"):
        datamodule = build_datamodule(cfg)
    check_input_size(cfg, datamodule.info)
    combo = f"technique={cfg.technique.name} on backbone={cfg.backbone.name}"
    with constructor_errors(combo):
        module = build_module(cfg, datamodule)
        module.check_run(cfg)
    return datamodule, module


def check_input_size(cfg: DictConfig, info: DataInfo) -> None:
    """Build the bare backbone and run one zero image of the dataset's size through it (CPU,
    eval mode, no gradients: about the cost of one test image).

    A model built for another size (a ViT's fixed patch grid, a pooling that leaves nothing)
    fails here, saying what to set, instead of in an assertion deep inside a technique's model
    analysis or the first training step. Any model, no list of special cases.
    """
    import torch

    from dynlab.backbones import create_backbone

    name, kwargs = cfg.backbone.name, OmegaConf.to_container(cfg.backbone.kwargs, resolve=True)
    c, h, w = info.input_size
    # The RNG is put back afterwards: the run's own weights come out as without the check.
    with torch.random.fork_rng(devices=[]), constructor_errors(f"backbone={name}"):
        net = create_backbone(name, num_classes=info.num_classes, in_chans=c, **kwargs)
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, c, h, w))
    except Exception as err:  # whatever the model raises on a zero image, the size is the cause
        built_for = (getattr(net, "pretrained_cfg", None) or {}).get("input_size")
        hint = f" (it is built for {'x'.join(map(str, built_for))})" if built_for else ""
        raise ConfigError(
            f"backbone {name} cannot take {info.name}'s input size {c}x{h}x{w}{hint}: "
            f"{_first_line(err)}. Models with a fixed input size take "
            f"+backbone.kwargs.img_size={h}, or pick a backbone for this image size "
            "(backbone=cifar_resnet20 for 32x32)."
        ) from err


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is no readable checkpoint (missing, not torch's zip format, truncated, bad
    CRC), or None when it is one. Reads the file's bytes but unpickles nothing (cheap)."""
    path = Path(path)
    if path.is_dir():
        return "a directory, not a checkpoint file (checkpoints are <run dir>/checkpoints/<phase>/*.ckpt)"
    if not path.is_file():
        return "no such checkpoint file"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(
                name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist()
            ):
                return "a zip file, but not a torch checkpoint"
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"not a torch checkpoint, or cut short: {err}"
    return f"corrupt entry {bad}" if bad is not None else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
