"""Schema of `technique=baseline`."""

from dataclasses import dataclass

from dynlab.config import TechniqueConfig, register_schema


@dataclass
class BaselineConfig(TechniqueConfig):
    _target_: str = "dynlab.techniques.baseline.module.BaselineModule"
    name: str = "baseline"


register_schema("technique", "baseline", BaselineConfig)
