"""Schema of `technique=gfnet` (Wang et al., "Glance and Focus: a Dynamic Approach to Reducing
Spatial Redundancy in Image Classification", NeurIPS 2020; official code
blackfeather-wang/GFNet-Pytorch). Defaults are the official ResNet settings (configs.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

from dynlab.config import TechniqueConfig, register_schema


class ClassifierKind(StrEnum):
    # A GRU over the steps' pooled features (official Full_layer with fc_rnn=True: ResNet,
    # DenseNet, RegNet).
    gru = "gru"
    # One linear layer per step over the concatenated features of steps 1..t; step 1 is the glance
    # encoder's own head (fc_rnn=False: MobileNetV3, EfficientNet).
    cascade = "cascade"


class PolicyEncoder(StrEnum):
    # Flattened feature map -> 2048 -> hidden, ReLU after each (official ActorCritic, ResNet).
    linear = "linear"
    # 1x1 conv to 32 channels, ReLU, flatten, linear to hidden (MobileNetV3, EfficientNet, RegNet).
    conv = "conv"


@dataclass
class PPOConfig:
    """Stage 2's proximal policy optimisation (official network.py `PPO`)."""

    gamma: float = 0.7  # discount of the per-step rewards
    clip: float = 0.2  # eps_clip of the clipped surrogate
    value_weight: float = 0.5  # weight of MSE(value, return)
    entropy_weight: float = 0.01

    def __post_init__(self) -> None:
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gfnet ppo.gamma must be in [0, 1], got {self.gamma}")
        if self.clip <= 0:
            raise ValueError(f"gfnet ppo.clip must be > 0, got {self.clip}")


@dataclass
class GFNetConfig(TechniqueConfig):
    PHASES: ClassVar[tuple[str, ...]] = ("glance", "stage_1", "stage_2", "stage_3")
    CALIBRATED_EXITS: ClassVar[bool] = True

    _target_: str = "dynlab.techniques.gfnet.module.GFNetModule"
    name: str = "gfnet"
    patch_size: int = 96  # P: the glance input size and the focus patches' size
    T: int = 5  # glance + at most T - 1 focus steps; each step is an exit
    # Glance input: the whole image resized to PxP (official utils.py get_prime: bicubic,
    # align_corners=True).
    glance_interpolation: str = "bicubic"
    classifier: ClassifierKind = ClassifierKind.gru
    classifier_hidden: int = 1024  # GRU hidden size (fc_hidden_dim)
    policy_encoder: PolicyEncoder = PolicyEncoder.linear
    policy_hidden: int = 1024  # policy_hidden_dim: 1024 for ResNet, 256 for MobileNetV3
    policy_width: int = 2048  # the linear encoder's first layer
    policy_conv_channels: int = 32  # the conv encoder's 1x1 conv
    # The Gaussian around the actor's location in stages 2 and 3 (official MultivariateNormal
    # with scale_tril = diag(0.1): a standard deviation of 0.1); the mean at evaluation.
    action_std: float = 0.1
    # lambda of (1/T) sum_t [CE(f_C at t) + lambda CE(encoder's own head at t)]:
    # official train.py dsn_ratio, 1 for ResNet/DenseNet/RegNet and 5 for MobileNet/EfficientNet.
    dsn_weight: float = 1.0
    # Train the glance encoder in stages 1 and 3 (ResNet, DenseNet, RegNet). False: a first phase
    # `glance` fine-tunes it alone on PxP glances (skipped when glance_init_from gives one already
    # fine-tuned), then it stays frozen (MobileNet, EfficientNet; official train.py
    # train_model_prime and official issue #4).
    train_glance: bool = True
    # A `technique=baseline` checkpoint both encoders start from (the official code starts from
    # ImageNet-pretrained encoders); glance_init_from overrides it for the glance encoder.
    init_from: str | None = None
    glance_init_from: str | None = None
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.T < 1:
            raise ValueError(f"gfnet T={self.T}: T counts the glance plus focus steps, so T >= 1")
        if self.patch_size < 1:
            raise ValueError(f"gfnet patch_size={self.patch_size}: must be >= 1")
        if self.glance_interpolation not in ("bicubic", "bilinear", "area", "nearest"):
            raise ValueError(
                f"gfnet glance_interpolation={self.glance_interpolation!r}: use bicubic, "
                "bilinear, area or nearest"
            )
        for name in ("classifier_hidden", "policy_hidden", "policy_width", "policy_conv_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"gfnet {name} must be >= 1, got {getattr(self, name)}")
        if self.action_std <= 0:
            raise ValueError(f"gfnet action_std must be > 0, got {self.action_std}")


register_schema("technique", "gfnet", GFNetConfig)
