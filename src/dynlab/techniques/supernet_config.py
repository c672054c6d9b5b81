"""What the weight-sharing searches' schemas share (SPOS, FBNetV2): one name for a given
architecture, `technique.architecture` (search_result.json's `architecture`) or
`technique.architecture_file` (a search_result.json); the techniques' older names are kept as
deprecated aliases (`DEPRECATED`). No torch here, as in every schema."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynlab.config import TechniqueConfig


@dataclass
class SupernetConfig(TechniqueConfig):
    """A supernet technique's schema: with an architecture given, its schedule is `retrain`
    alone."""

    # A given architecture in the form the technique's search writes (SPOS: its genes; FBNetV2:
    # its choices dict); `Any`: OmegaConf's unions take primitive types only.
    architecture: Any = None
    # A search's search_result.json to take the architecture from.
    architecture_file: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.architecture is not None and self.architecture_file is not None:
            raise ValueError(
                f"{self.name}: give technique.architecture or technique.architecture_file, not both"
            )
