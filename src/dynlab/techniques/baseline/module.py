"""`technique=baseline`: a backbone trained with cross-entropy; one exit on the accuracy-vs-MACs chart."""

from __future__ import annotations

from dynlab.config import BackboneConfig
from dynlab.data.base import DataInfo
from dynlab.protocol import StaticExits
from dynlab.techniques.base import DynlabModule, dataset_backbone
from dynlab.techniques.baseline.config import BaselineConfig


class BaselineModule(DynlabModule):
    def __init__(
        self, config: BaselineConfig, backbone: BackboneConfig, data_info: DataInfo
    ) -> None:
        super().__init__(config, backbone)
        self.model = StaticExits(dataset_backbone(backbone, data_info))
