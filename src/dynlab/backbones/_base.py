"""What dynlab's CIFAR backbones share: timm's classifier API, the weight init, the timm config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from timm.layers import ClassifierHead
from torch import Tensor, nn


class ClassifierAPI(nn.Module):
    """timm's classifier API over `forward_features` (defined by subclasses) and a `head` module
    with an `fc` and `reset(num_classes)` (timm's ClassifierHead, or a network's own head)."""

    head: nn.Module
    num_classes: int

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """The head on the features: pooling, ..., the linear classifier (skipped when
        `pre_logits`)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final linear layer (nn.Identity when there are no classes)."""
        return self.head.fc  # type: ignore[return-value]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one for `num_classes` (0 removes it)."""
        self.num_classes = int(num_classes)
        self.head.reset(num_classes)  # type: ignore[operator]


class CifarClassifier(ClassifierAPI):
    """A feature extractor (`forward_features`, defined by subclasses) plus timm's classifier head:
    global average pooling, dropout and one linear layer."""

    def __init__(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = num_features
        self.head = ClassifierHead(num_features, num_classes, drop_rate=drop_rate)


def reinitialise(model: nn.Module, init: Callable[[nn.Module], None]) -> None:
    """Fresh weights and BN statistics, as at construction: every conv, linear and BN layer
    reset (from the torch RNG), then the model's own `init` (a supernet's fresh start)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear | nn.BatchNorm2d):
            m.reset_parameters()
    init(model)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs (He et al. 2015), BN weight 1 and bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def cifar_cfg(pool_size: tuple[int, int], first_conv: str) -> dict[str, Any]:
    """timm's model config: 10 CIFAR classes at 3x32x32, CIFAR-10 channel statistics, no weights."""
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": pool_size,
        "crop_pct": 1.0,
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "first_conv": first_conv,
        "classifier": "head.fc",
    }


def imagenet_cfg(first_conv: str, classifier: str, interpolation: str) -> dict[str, Any]:
    """timm's model config: 1000 ImageNet classes at 3x224x224 (7x7 final map), ImageNet channel
    statistics, crop 0.875, no weights."""
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": interpolation,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": first_conv,
        "classifier": classifier,
    }
