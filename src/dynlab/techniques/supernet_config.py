"""What the weight-sharing searches' schemas share (SPOS, FBNetV2): one name for a given
architecture, `technique.architecture` (search_result.json's `architecture`) or
`technique.architecture_file` (a search_result.json), with the techniques' older names kept as
deprecated aliases. No torch here: validation reads it before anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from dynlab.config import TechniqueConfig


@dataclass
class SupernetConfig(TechniqueConfig):
    """A supernet technique's schema: with an architecture given, its schedule is `retrain`
    alone."""

    # Older field -> its name now; a run that sets the older one gets a one-line note
    # (`deprecated_settings`) and the value moves to the new field.
    DEPRECATED: ClassVar[dict[str, str]] = {}

    # A given architecture in the form the technique's search writes (SPOS: its genes; FBNetV2:
    # its choices dict); `Any`: OmegaConf's unions take primitive types only.
    architecture: Any = None
    # A search's search_result.json to take the architecture from.
    architecture_file: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
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
        if self.architecture is not None and self.architecture_file is not None:
            raise ValueError(
                f"{self.name}: give technique.architecture or technique.architecture_file, not both"
            )


def deprecated_settings(technique: Any, schema: type) -> list[str]:
    """One line per deprecated field set in the `technique` node of a `schema` run."""
    return [
        f"technique.{old} is deprecated: it still works, as technique.{new}; write that instead"
        for old, new in getattr(schema, "DEPRECATED", {}).items()
        if technique.get(old) is not None
    ]
