"""dynlab's CIFAR networks, registered in timm's registry on import with the capabilities each
declares (`registry`), and a checked factory.

`import dynlab.backbones` makes `timm.create_model("cifar_resnet56", num_classes=10)` work, and
`backbone_capabilities("cifar_condensenetv2_110")` say what that backbone can do.
"""

from dynlab.backbones import (  # noqa: F401  (registers)
    anglenas_mobilenet,
    cifar_mobilenetv2,
    cifar_repvgg,
    cifar_resnet,
    cifar_vgg,
    condensenetv2,
    fbnetv2,
    metapruning,
    sfr_shufflenetv2,
    spos_shufflenetv2,
    weightnet_shufflenetv2,
)
from dynlab.backbones.factory import (
    BackboneArgumentError,
    UnknownBackboneError,
    create_backbone,
    is_known_backbone,
)
from dynlab.backbones.registry import (
    backbone_capabilities,
    backbones_with,
    list_backbones,
    register_backbone,
)
from dynlab.capabilities import Capability

__all__ = [
    "BackboneArgumentError",
    "Capability",
    "UnknownBackboneError",
    "backbone_capabilities",
    "backbones_with",
    "create_backbone",
    "is_known_backbone",
    "list_backbones",
    "register_backbone",
]
