"""dynlab's backbones in timm's registry, each with the capabilities it declares where it is
defined, so validation and the techniques ask what a backbone can do instead of knowing names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from timm.models import register_model

from dynlab.capabilities import Capability

Entrypoint = TypeVar("Entrypoint", bound=Callable[..., Any])

_DECLARED: dict[str, frozenset[Capability]] = {}


def register_backbone(*capabilities: Capability) -> Callable[[Entrypoint], Entrypoint]:
    """Register a model entry point in timm's registry under its function name (timm's
    `register_model`), declaring what the model can do (none: a plain classifier)."""

    def register(entrypoint: Entrypoint) -> Entrypoint:
        _DECLARED[entrypoint.__name__] = frozenset(capabilities)
        return register_model(entrypoint)

    return register


def list_backbones() -> list[str]:
    """The backbones registered with `register_backbone` (dynlab's own, and any a user declares),
    sorted."""
    return sorted(_DECLARED)


def backbone_capabilities(name: str) -> frozenset[Capability]:
    """What backbone `name` declares it can do (empty for a model registered without declaring,
    such as timm's own: a technique judges those on the built network)."""
    return _DECLARED.get(name, frozenset())


def backbones_with(capability: Capability) -> list[str]:
    """The registered backbones that declare `capability`, sorted."""
    return sorted(name for name, declared in _DECLARED.items() if capability in declared)
