"""`technique=baseline`: a backbone trained with cross-entropy; one exit on the accuracy-vs-MACs chart."""

from __future__ import annotations

from dynlab.config import BackboneConfig, OptimConfig
from dynlab.data.base import DataInfo
from dynlab.protocol import StaticExits
from dynlab.techniques.base import DynlabModule, dataset_backbone


class BaselineModule(DynlabModule):
    def __init__(
        self,
        backbone: BackboneConfig,
        data_info: DataInfo,
        optim: OptimConfig | None = None,
    ) -> None:
        super().__init__(optim)
        self.save_hyperparameters(ignore=["data_info"])
        self.model = StaticExits(dataset_backbone(backbone, data_info))
