"""Checks that a composed config can work, cheapest first, each failing with one clear line.

Hydra's structured configs already reject a misspelt key or a wrong type at composition. Then:
1. `validate_config` (light: no torch) checks combinations and the schemas' own `__post_init__`
   rules, then that the backbone name exists (imports timm);
2. `build_run` builds the datamodule, runs one zero image of the dataset's size through the bare
   backbone (a model that cannot take it fails here, saying what to set), then builds the
   technique's module and asks it to check the rest of the run (`check_run`: e.g. enough epochs for
   its schedule), turning a `ValueError` (a setting or backbone the technique cannot use) into a
   `ConfigError`.
`checkpoint_problem` tells a readable checkpoint from a missing, truncated or foreign file
without torch.
"""

from __future__ import annotations

import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dynlab.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from dynlab.data.base import DataInfo, DynlabDataModule
    from dynlab.techniques.base import DynlabModule

# Groups whose schemas may check their values in `__post_init__` (run by `OmegaConf.to_object`).
SCHEMA_GROUPS = ("backbone", "technique", "dataset", "trainer", "logger", "evaluation")


class ConfigError(UserError, ValueError):
    """A composed config that cannot work, found before anything expensive starts."""


def validate_config(cfg: DictConfig) -> None:
    """Checks beyond the schemas' types: names that must exist and settings that must agree."""
    check_devices(cfg)
    check_schema_rules(cfg)
    check_backbone_name(cfg)


def check_devices(cfg: DictConfig) -> None:
    """Several CPU processes need a DDP strategy (Lightning would silently run one)."""
    devices, strategy = cfg.trainer.devices, cfg.trainer.strategy
    multi_cpu = cfg.trainer.accelerator == "cpu" and isinstance(devices, int) and devices > 1
    if multi_cpu and strategy in ("auto", None):
        raise ConfigError(
            f"trainer.devices={devices} on CPU needs a DDP strategy: use trainer=ddp_cpu "
            "(or trainer.strategy=ddp)"
        )


def check_schema_rules(cfg: DictConfig) -> None:
    """Build each group's schema object, so its `__post_init__` range checks run now (cheap)."""
    for group in SCHEMA_GROUPS:
        node = cfg.get(group)
        if not OmegaConf.is_config(node) or OmegaConf.get_type(node) in (dict, None):
            continue
        try:
            OmegaConf.to_object(node)
        except (ValueError, OmegaConfBaseException) as err:
            raise ConfigError(f"{group}: {_first_line(err)}") from err


def check_backbone_name(cfg: DictConfig) -> None:
    """The backbone exists in dynlab's or timm's registry (imports timm, so it comes last)."""
    from dynlab.backbones import UnknownBackboneError, is_known_backbone

    if not is_known_backbone(cfg.backbone.name):
        raise UnknownBackboneError(cfg.backbone.name)


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
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise ConfigError(f"{what}: {_first_line(err)}") from err


def build_run(cfg: DictConfig) -> tuple[DynlabDataModule, DynlabModule]:
    """The datamodule and the technique's module, with the backbone checked on the dataset's
    input size before the technique transforms it."""
    from dynlab.runner import build_datamodule, build_module

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
