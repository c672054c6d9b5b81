"""GFNet's network: glance encoder, local encoder, recurrent classifier and patch policy.

Wang et al., "Glance and Focus: a Dynamic Approach to Reducing Spatial Redundancy in Image
Classification", NeurIPS 2020, Sec. 3 (official code blackfeather-wang/GFNet-Pytorch). Step 1
(glance) classifies the whole image resized to PxP; each later step (focus) crops a PxP patch of
the full-resolution image where the policy points, and the classifier updates its recurrent state.
Every step is an exit. Recurrent states are passed explicitly (`GFState`), never kept on a module,
so the network is safe under DDP and in an early-exit session that drops samples.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal

from dynlab.evaluation.macs import count_macs
from dynlab.evaluation.outputs import evaluating, module_device
from dynlab.nn.reparam import fold_and_merge
from dynlab.protocol import DynamicNet, ExitStage
from dynlab.techniques.gfnet.config import ClassifierKind, PolicyEncoder


class Locate(StrEnum):
    """Where the focus patches come from."""

    random = "random"  # uniform locations (stage 1)
    sample = "sample"  # the policy's Gaussian (stages 2 and 3)
    mean = "mean"  # the policy's mean (evaluation and inference)


class GRUCell(nn.Module):
    """torch.nn.GRUCell's equations (Cho et al. 2014) on two Linear layers, so that the MAC counter
    sees them; `h=None` is the zero state (still multiplied, so every weight takes part in every
    step and DDP never finds an unused parameter)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.input = nn.Linear(input_size, 3 * hidden_size)
        self.hidden = nn.Linear(hidden_size, 3 * hidden_size)
        bound = 1.0 / math.sqrt(hidden_size)  # nn.GRU's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, h: Tensor | None) -> Tensor:
        if h is None:
            h = x.new_zeros(x.shape[0], self.hidden_size)
        i_r, i_z, i_n = self.input(x).chunk(3, dim=1)
        h_r, h_z, h_n = self.hidden(h).chunk(3, dim=1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h


class Encoder(nn.Module):
    """A timm-style backbone as a GFNet encoder: pooled feature and last feature map of an image,
    and the backbone's own classifier on the pooled feature (GFNet's auxiliary loss)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feature_map = self.net.forward_features(x)  # type: ignore[operator]
        return self.net.forward_head(feature_map, pre_logits=True), feature_map  # type: ignore[operator]

    def own_logits(self, feature: Tensor) -> Tensor:
        return self.net.get_classifier()(feature)  # type: ignore[operator]


class RecurrentClassifier(nn.Module):
    """f_C for ResNet/DenseNet/RegNet: a GRU over the steps' pooled features, then a linear layer
    (official network.py `Full_layer`, fc_rnn=True)."""

    def __init__(self, feature_dim: int, hidden: int, num_classes: int, steps: int) -> None:
        super().__init__()
        self.gru = GRUCell(feature_dim, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, feature: Tensor, state: Tensor | None, step: int) -> tuple[Tensor, Tensor]:
        h = self.gru(feature, state)
        return self.fc(h), h


class CascadeClassifier(nn.Module):
    """f_C for MobileNetV3/EfficientNet: step t >= 2 is a linear layer over the concatenated
    features of steps 1..t; step 1 has none (the glance encoder's own head answers there)
    (official network.py `Full_layer`, fc_rnn=False, with fc_2..fc_T)."""

    def __init__(self, feature_dim: int, hidden: int, num_classes: int, steps: int) -> None:
        super().__init__()
        self.fcs = nn.ModuleList(
            nn.Linear(feature_dim * t, num_classes) for t in range(2, steps + 1)
        )

    def forward(
        self, feature: Tensor, state: Tensor | None, step: int
    ) -> tuple[Tensor | None, Tensor]:
        state = feature if state is None else torch.cat([state, feature], dim=1)
        return (None if step == 0 else self.fcs[step - 1](state)), state


CLASSIFIERS: dict[ClassifierKind, type[nn.Module]] = {
    ClassifierKind.gru: RecurrentClassifier,
    ClassifierKind.cascade: CascadeClassifier,
}


def _linear_encoder(map_shape: tuple[int, int, int], hidden: int, width: int, _: int) -> nn.Module:
    """ResNet/DenseNet: the flattened map through two ReLU layers (official ActorCritic)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(map_shape), width),
        nn.ReLU(),
        nn.Linear(width, hidden),
        nn.ReLU(),
    )


def _conv_encoder(map_shape: tuple[int, int, int], hidden: int, _: int, channels: int) -> nn.Module:
    """MobileNetV3/EfficientNet/RegNet: a 1x1 conv to a few channels first (official ActorCritic)."""
    c, h, w = map_shape
    return nn.Sequential(
        nn.Conv2d(c, channels, 1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * h * w, hidden),
        nn.ReLU(),
    )


POLICY_ENCODERS: dict[PolicyEncoder, Callable[[tuple[int, int, int], int, int, int], nn.Module]]
POLICY_ENCODERS = {PolicyEncoder.linear: _linear_encoder, PolicyEncoder.conv: _conv_encoder}


class PatchPolicy(nn.Module):
    """pi: actor-critic over the previous step's (detached) feature map; a GRU carries the history.

    The actor's sigmoid output is the mean location in [0,1]^2 (row, column); actions are drawn
    from a Gaussian with std `action_std` and clipped to [0,1], as the official `ActorCritic.act`.
    """

    def __init__(
        self,
        map_shape: tuple[int, int, int],
        kind: PolicyEncoder,
        hidden: int,
        width: int,
        conv_channels: int,
        action_std: float,
    ) -> None:
        super().__init__()
        self.encoder = POLICY_ENCODERS[kind](map_shape, hidden, width, conv_channels)
        self.gru = GRUCell(hidden, hidden)
        self.actor = nn.Linear(hidden, 2)
        self.critic = nn.Linear(hidden, 1)
        self.action_std = action_std

    def step(self, feature_map: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
        """The mean location and the new hidden state."""
        h = self.gru(self.encoder(feature_map), h)
        return torch.sigmoid(self.actor(h)), h

    def act(
        self, feature_map: Tensor, h: Tensor | None, sample: bool, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """(location, its log-probability when sampled, new hidden state)."""
        mean, h = self.step(feature_map, h)
        if not sample:
            return mean, None, h
        noise = torch.randn(mean.shape, device=mean.device, generator=generator)
        action = (mean + self.action_std * noise).clamp(0.0, 1.0)
        return action, self.distribution(mean).log_prob(action).sum(-1), h

    def distribution(self, mean: Tensor) -> Normal:
        return Normal(mean, torch.full_like(mean, self.action_std))

    def evaluate(self, states: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Log-probabilities, values and entropies [S,B] of `actions` [S,B,2] taken on the feature
        maps `states` [S,B,C,H,W], the GRU rerun from the zero state (official `evaluate`)."""
        h, logps, values, entropies = None, [], [], []
        for state, action in zip(states, actions, strict=True):
            mean, h = self.step(state, h)
            dist = self.distribution(mean)
            logps.append(dist.log_prob(action).sum(-1))
            entropies.append(dist.entropy().sum(-1))
            values.append(self.critic(h).squeeze(-1))
        return torch.stack(logps), torch.stack(values), torch.stack(entropies)


def crop_corners(
    location: Tensor, image_size: tuple[int, int], patch_size: int
) -> tuple[Tensor, Tensor]:
    """Top-left (row, column) of the PxP patches at locations [B,2] in [0,1]:
    floor(a * (size - P)) per axis (official utils.py get_patch)."""
    location = location.clamp(0.0, 1.0)
    h, w = image_size
    top = torch.floor(location[:, 0] * (h - patch_size)).long()
    left = torch.floor(location[:, 1] * (w - patch_size)).long()
    return top, left


def crop_patches(images: Tensor, location: Tensor, patch_size: int) -> Tensor:
    """PxP patches [B,C,P,P] of `images` [B,C,H,W] at locations [B,2] (`crop_corners`),
    gathered in one indexing op rather than the official per-sample loop."""
    b = images.shape[0]
    top, left = crop_corners(location, images.shape[-2:], patch_size)
    offsets = torch.arange(patch_size, device=images.device)
    rows = (top[:, None] + offsets)[:, :, None]  # [B,P,1]
    cols = (left[:, None] + offsets)[:, None, :]  # [B,1,P]
    batch = torch.arange(b, device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


@dataclass
class GFState:
    """One batch's progress through the steps: the image, the last feature map, the classifier's
    and the policy's recurrent states."""

    image: Tensor
    step: int = 0
    feature_map: Tensor | None = None
    classifier_state: Tensor | None = None
    policy_state: Tensor | None = None

    CARRIED = ("feature_map", "classifier_state", "policy_state")  # from one step to the next

    def keep(self, mask: Tensor) -> None:
        """Drop the samples where `mask` is False."""
        for name in ("image", *self.CARRIED):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[mask])


@dataclass
class StepOutput:
    """What one step gives: the exit's logits, the encoder's own logits (when asked for), and for a
    focus step the location [B,2], its log-probability (sampled) and the map the policy read."""

    logits: Tensor
    own_logits: Tensor | None = None
    location: Tensor | None = None
    logprob: Tensor | None = None
    policy_input: Tensor | None = None


class GFNet(DynamicNet):
    """Glance + up to T-1 focus steps, one exit each (see the module docstring)."""

    def __init__(
        self,
        glance: nn.Module,
        local: nn.Module,
        *,
        num_classes: int,
        input_size: tuple[int, int, int],
        patch_size: int,
        steps: int,
        interpolation: str = "bicubic",
        classifier: ClassifierKind = ClassifierKind.gru,
        classifier_hidden: int = 1024,
        policy_encoder: PolicyEncoder = PolicyEncoder.linear,
        policy_hidden: int = 1024,
        policy_width: int = 2048,
        policy_conv_channels: int = 32,
        action_std: float = 0.1,
    ) -> None:
        super().__init__()
        channels, height, width = input_size
        if patch_size >= min(height, width):
            raise ValueError(
                f"patch_size={patch_size} is not smaller than the {height}x{width} images: a "
                f"focus patch must be a part of the image (set a patch size below {min(height, width)})"
            )
        self.glance, self.local = Encoder(glance), Encoder(local)
        self.input_size = input_size
        self.patch_size, self.num_steps, self.interpolation = patch_size, steps, interpolation
        feature_dim, map_shape = _probe(self.local, channels, patch_size)
        self.classifier = CLASSIFIERS[ClassifierKind(classifier)](
            feature_dim, classifier_hidden, num_classes, steps
        )
        self.uses_glance_head = isinstance(self.classifier, CascadeClassifier)
        self.policy = (
            PatchPolicy(
                map_shape,
                PolicyEncoder(policy_encoder),
                policy_hidden,
                policy_width,
                policy_conv_channels,
                action_std,
            )
            if steps > 1
            else None
        )

    # --- the steps ----------------------------------------------------------------------------
    def glimpse(self, image: Tensor) -> Tensor:
        """The whole image resized to PxP (official utils.py get_prime)."""
        corners = self.interpolation in ("bilinear", "bicubic")
        return F.interpolate(
            image,
            size=(self.patch_size, self.patch_size),
            mode=self.interpolation,
            align_corners=True if corners else None,
        )

    def step(
        self,
        state: GFState,
        locate: Locate = Locate.mean,
        *,
        own_head: bool = False,
        location: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """Run the next step on `state` (glance first, then focus steps) and advance it."""
        if state.step >= self.num_steps:
            raise RuntimeError(f"GFNet has {self.num_steps} steps; all have run")
        out = StepOutput(logits=state.image)  # logits set below
        if state.step == 0:
            feature, feature_map = self.glance(self.glimpse(state.image))
            encoder = self.glance
        else:
            assert state.feature_map is not None
            out.policy_input = state.feature_map.detach()
            if location is None and locate == Locate.random:
                b = state.image.shape[0]
                location = torch.rand(b, 2, device=state.image.device, generator=generator)
            elif location is None:
                assert self.policy is not None
                location, out.logprob, state.policy_state = self.policy.act(
                    out.policy_input, state.policy_state, locate == Locate.sample, generator
                )
            out.location = location
            feature, feature_map = self.local(crop_patches(state.image, location, self.patch_size))
            encoder = self.local
        if own_head or (state.step == 0 and self.uses_glance_head):
            out.own_logits = encoder.own_logits(feature)
        logits, state.classifier_state = self.classifier(
            feature, state.classifier_state, state.step
        )
        out.logits = out.own_logits if logits is None else logits
        state.feature_map, state.step = feature_map, state.step + 1
        return out

    def rollout(
        self,
        x: Tensor,
        locate: Locate = Locate.mean,
        *,
        steps: int | None = None,
        own_head: bool = False,
        generator: torch.Generator | None = None,
    ) -> list[StepOutput]:
        """All steps (or the first `steps`) on a batch."""
        state = GFState(x)
        return [
            self.step(state, locate, own_head=own_head, generator=generator)
            for _ in range(steps or self.num_steps)
        ]

    # --- the dynamic-model protocol -----------------------------------------------------------
    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return [out.logits for out in self.rollout(x)]

    def exit_session(self, x: Tensor) -> GFNetSession:
        return GFNetSession(self, x)

    def exit_macs(self, input_size: tuple[int, int, int]) -> list[float]:
        """Cumulative MACs to each exit: encoders, policy and classifier, measured."""
        return [
            float(count_macs(lambda x, k=k: self.rollout(x, steps=k), input_size, module=self))
            for k in range(1, self.num_steps + 1)
        ]

    def export_stages(self) -> list[ExitStage]:
        """One `GFNetStep` per step; what a step carries to the next (the feature map the policy
        reads, the classifier's and the policy's recurrent states) is found by running the steps."""
        state = GFState(torch.zeros(1, *self.input_size, device=module_device(self)))
        carried: list[tuple[str, ...]] = [()]
        with evaluating(self):
            for _ in range(self.num_steps):
                self.step(state)
                carried.append(tuple(f for f in GFState.CARRIED if getattr(state, f) is not None))
        carried[-1] = ()  # nothing runs after the last step
        return [GFNetStep(self, k, carried[k], carried[k + 1]) for k in range(self.num_steps)]

    def deploy(self) -> Self:
        """An eval-mode copy with each encoder's BatchNorms folded into its convs and its
        re-parameterisable blocks (ACNet, RepVGG, FReLU) merged."""
        if self.deployed:
            return self
        net = copy.deepcopy(self).eval()
        for encoder in (net.glance, net.local):
            fold_and_merge(encoder.net, method="forward_features")
        net.deployed = True
        return net.requires_grad_(False)


class GFNetStep(ExitStage):
    """Step k as a module of tensors (`dynlab.protocol.ExitStage`): the `GFState` fields
    `carried_in` in, the logits and the fields `carried_out` out; focus patches at the policy's
    mean, as in every evaluation."""

    def __init__(
        self, net: GFNet, step: int, carried_in: tuple[str, ...], carried_out: tuple[str, ...]
    ) -> None:
        super().__init__()
        self.net, self.step, self.carried_in, self.carried_out = net, step, carried_in, carried_out

    def forward(self, image: Tensor, *carried: Tensor) -> tuple[Tensor, ...]:
        state = GFState(image, self.step, **dict(zip(self.carried_in, carried, strict=True)))
        logits = self.net.step(state).logits
        return (logits, *(getattr(state, name) for name in self.carried_out))


class GFNetSession:
    """Early-exit evaluation: one step per exit; `keep` drops samples from every later step."""

    def __init__(self, net: GFNet, x: Tensor) -> None:
        self.net, self.state = net, GFState(x)
        self.num_exits = net.num_steps

    def next_exit(self) -> Tensor:
        return self.net.step(self.state).logits

    def keep(self, mask: Tensor) -> None:
        self.state.keep(mask)


def _probe(encoder: Encoder, channels: int, patch_size: int) -> tuple[int, tuple[int, int, int]]:
    """Pooled-feature size and feature-map shape (C,H,W) of the encoder on a PxP patch; a ValueError
    naming what works when it has no spatial map (a ViT's tokens) or cannot take the patch."""
    name = type(encoder.net).__name__
    try:
        with torch.random.fork_rng(devices=[]), evaluating(encoder):
            feature, feature_map = encoder(torch.zeros(1, channels, patch_size, patch_size))
    except Exception as err:  # whatever it raises, the patch size is the cause
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"the backbone ({name}) cannot take {patch_size}x{patch_size} patches ({reason}); "
            "pick a patch size it accepts, or a CNN backbone"
        ) from err
    if feature_map.dim() != 4:
        raise ValueError(
            f"GFNet needs a backbone whose forward_features is a spatial feature map [B,C,H,W] "
            f"(the policy reads it to choose the next patch); {name} gives shape "
            f"{tuple(feature_map.shape)}. Use a CNN: resnet50, mobilenetv3_large_100, "
            "cifar_resnet20, ..."
        )
    return int(feature.shape[1]), tuple(int(d) for d in feature_map.shape[1:])  # type: ignore[return-value]
