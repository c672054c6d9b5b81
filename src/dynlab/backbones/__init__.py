"""dynlab's CIFAR networks, registered in timm's registry on import, and a checked factory.

`import dynlab.backbones` makes `timm.create_model("cifar_resnet56", num_classes=10)` work.
"""

from dynlab.backbones import (  # noqa: F401  (registers)
    cifar_mobilenetv2,
    cifar_repvgg,
    cifar_resnet,
    cifar_vgg,
    condensenetv2,
    fbnetv2,
    sfr_shufflenetv2,
    spos_shufflenetv2,
)
from dynlab.backbones.factory import (
    BackboneArgumentError,
    UnknownBackboneError,
    create_backbone,
    is_known_backbone,
    list_backbones,
)

__all__ = [
    "BackboneArgumentError",
    "UnknownBackboneError",
    "create_backbone",
    "is_known_backbone",
    "list_backbones",
]
