"""The error a schema rule raises and the range check most rules use (shared by every schema
module: `dynlab.config`, `dynlab.dataset_config`, the techniques' configs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class SettingError(ValueError):
    """A schema rule that setting `key` (relative to its schema's node) breaks; validation reports
    it under the node's full key: `technique.optim.lr=-1.0: ...`."""

    def __init__(self, key: str, value: Any, rule: str) -> None:
        super().__init__(f"{key}={value}: {rule}")
        self.key, self.value, self.rule = key, value, rule


def at_least(values: Mapping[str, Any], least: float) -> None:
    """Each set (non-None) value is >= `least`."""
    for key, value in values.items():
        if value is not None and value < least:
            raise SettingError(key, value, f"must be >= {least:g}")
