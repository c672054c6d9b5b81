"""A run's DataModule and technique module, instantiated from the composed config.

Shared by the runner (which drives the schedule) and validation (whose `build_run` checks the
pair before anything trains), so neither imports the other.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from dynlab.config import BackboneConfig

if TYPE_CHECKING:
    from dynlab.data.base import DynlabDataModule
    from dynlab.techniques.base import DynlabModule


def build_datamodule(cfg: DictConfig) -> DynlabDataModule:
    """The dataset's DataModule; a missing data root fails here with where to put the data."""
    return _instantiate(constructor_node(cfg, "dataset"))


def build_module(cfg: DictConfig, datamodule: DynlabDataModule) -> DynlabModule:
    """The technique's LightningModule on the chosen backbone, sized for the dataset, with the
    technique's phase recipes."""
    backbone = OmegaConf.to_object(cfg.backbone)
    assert isinstance(backbone, BackboneConfig)
    technique = constructor_node(cfg, "technique", "phases")
    module = _instantiate(
        technique, backbone=backbone, data_info=datamodule.info, _convert_="object"
    )
    recipes = OmegaConf.to_object(cfg.technique.phases) if "phases" in cfg.technique else {}
    module.set_recipes(recipes)  # type: ignore[arg-type]
    return module


def _instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, letting the constructor's own error (a missing data root, an
    incompatible backbone) reach the user instead of Hydra's wrapper around it."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise


def constructor_node(cfg: DictConfig, group: str, *spine_keys: str) -> DictConfig:
    """A group's node minus its `name` (which identifies the choice) and the `spine_keys` the
    runner consumes itself: none of them is a constructor argument.

    Copied with its root so interpolations such as `${seed}` still resolve.
    """
    root = copy.deepcopy(cfg)
    with open_dict(root[group]):
        for key in ("name", *spine_keys):
            root[group].pop(key, None)
    return root[group]
