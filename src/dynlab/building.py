"""A run's DataModule and technique module, instantiated from the composed config.

Shared by the runner (which drives the schedule) and validation (whose `build_run` checks the
pair before anything trains), so neither imports the other.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from dynlab.config import BackboneConfig, TechniqueConfig

if TYPE_CHECKING:
    from dynlab.data.base import DynlabDataModule
    from dynlab.techniques.base import DynlabModule


def build_datamodule(cfg: DictConfig) -> DynlabDataModule:
    """The dataset's DataModule; a missing data root fails here with where to put the data."""
    return _instantiate(constructor_node(cfg, "dataset"))


def build_module(cfg: DictConfig, datamodule: DynlabDataModule) -> DynlabModule:
    """The technique's LightningModule (the class its `_target_` names) built from its typed config
    on the chosen backbone, sized for the dataset, with the technique's phase recipes."""
    backbone = OmegaConf.to_object(cfg.backbone)
    assert isinstance(backbone, BackboneConfig)
    config = technique_config(cfg)
    module = get_class(config._target_)(config, backbone, datamodule.info)
    module.set_recipes(config.phases)
    return module


def technique_config(cfg: DictConfig) -> TechniqueConfig:
    """The technique's node as its schema's object, interpolations (`${seed}`) resolved: what its
    module is built from."""
    config = OmegaConf.to_object(cfg.technique)
    if not isinstance(config, TechniqueConfig):
        raise ValueError(
            f"technique={cfg.technique.get('name')} has no schema: its config file must start from "
            "one (defaults: [/schema/technique/<name>@_here_]), a TechniqueConfig registered "
            "with dynlab.config.register_schema"
        )
    return config


def _instantiate(node: DictConfig) -> Any:
    """`hydra.utils.instantiate`, letting the constructor's own error (a missing data root) reach
    the user instead of Hydra's wrapper around it."""
    try:
        return instantiate(node)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise


def constructor_node(cfg: DictConfig, group: str) -> DictConfig:
    """A group's node minus its `name`, which identifies the choice and is no constructor
    argument.

    Copied with its root so interpolations such as `${seed}` still resolve.
    """
    root = copy.deepcopy(cfg)
    with open_dict(root[group]):
        root[group].pop("name", None)
    return root[group]
