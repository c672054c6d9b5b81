"""Builds any backbone by name: dynlab's own (registered in timm on import) or any timm model.

Names are checked before anything is built, so a typo in a config fails with the close matches
instead of timm's bare `Unknown model`.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
from timm.models import is_model
from torch import nn

from dynlab.backbones.registry import backbones_with, list_backbones
from dynlab.capabilities import Capability
from dynlab.errors import UserError


class UnknownBackboneError(UserError, ValueError):
    """A backbone name that neither dynlab nor timm registers; the message says which work."""

    def __init__(self, name: str) -> None:
        super().__init__(_unknown_backbone_message(name))
        self.name = name


class BackboneArgumentError(ValueError):
    """A keyword the backbone's constructor does not take (raised instead of its TypeError)."""


def is_known_backbone(name: str) -> bool:
    """Whether `create_backbone(name, ...)` can build `name` (cheap: a registry look-up)."""
    return is_model(name)


def create_backbone(name: str, num_classes: int, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """An untrained backbone `name` with a `num_classes`-way classifier (0: none).

    `kwargs` go to the model's constructor through `timm.create_model` (e.g. `drop_rate`).
    Weights are never downloaded: the model is always built with `pretrained=False`. A keyword
    the model does not take is a ValueError naming it (and, for `conv`/`act`, the backbones that
    take them).
    """
    if not is_known_backbone(name):
        raise UnknownBackboneError(name)
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 drops the classifier), got {num_classes}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if "pretrained" in kwargs:
        raise ValueError("create_backbone always builds untrained models; drop 'pretrained'")
    try:
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs
        )
    except TypeError as err:
        unknown = next((key for key in kwargs if f"argument '{key}'" in str(err)), None)
        if unknown is None:
            raise
        hint = ""
        if unknown in ("conv", "act"):
            takes = backbones_with(Capability.conv_act_options)
            hint = f"; backbones with conv/act options: {', '.join(takes)}"
        raise BackboneArgumentError(f"{name} takes no argument {unknown!r}{hint}") from err


def _unknown_backbone_message(name: str) -> str:
    """What was asked for, the close matches, and which names work."""
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    suggestion = f" Did you mean: {', '.join(close)}?" if close else ""
    return (
        f"Unknown backbone {name!r}.{suggestion} dynlab's own backbones: "
        f"{', '.join(list_backbones())}. Any name from timm.list_models() also works."
    )
