"""dynlab.backbones: CIFAR nets in timm's registry, their sizes and timm API, the factory."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models import model_entrypoint
from torch import nn

from dynlab.backbones import (
    BackboneArgumentError,
    Capability,
    UnknownBackboneError,
    backbone_capabilities,
    create_backbone,
    is_known_backbone,
    list_backbones,
)
from dynlab.backbones.fbnetv2 import FBNetV2Supernet
from dynlab.backbones.metapruning import PruningNet
from dynlab.evaluation.macs import count_macs
from dynlab.techniques.sfr.module import sparse_layers

CIFAR_NAMES = [
    "cifar_mobilenetv2",
    "cifar_repvgg_a0",
    "cifar_repvgg_b0",
    "cifar_resnet110",
    "cifar_resnet14",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet8",
    "cifar_vgg16_bn",
]

# name: ((min, max) parameters in M, (min, max) MACs in M) at 3x32x32 with 10 classes.
EXPECTED_SIZE = {
    "cifar_resnet8": ((0.07, 0.08), (12.0, 13.0)),
    "cifar_resnet14": ((0.17, 0.18), (26.0, 27.0)),
    "cifar_resnet20": ((0.26, 0.28), (40.0, 42.0)),
    "cifar_resnet56": ((0.84, 0.87), (125.0, 127.0)),
    "cifar_resnet110": ((1.70, 1.75), (252.0, 255.0)),
    "cifar_vgg16_bn": ((14.6, 14.8), (310.0, 316.0)),
    "cifar_mobilenetv2": ((2.2, 2.3), (85.0, 100.0)),
    # training form (3x3, 1x1 and identity branches); tests/test_blocks.py checks the deploy form
    "cifar_repvgg_a0": ((7.8, 7.9), (123.0, 124.0)),
}

# name: spatial size of forward_features' output for a 32x32 input.
FEATURE_SIZE = {name: 8 for name in CIFAR_NAMES if "resnet" in name}
FEATURE_SIZE |= {"cifar_vgg16_bn": 1, "cifar_mobilenetv2": 4, "cifar_repvgg_a0": 2}
FEATURE_SIZE |= {"cifar_repvgg_b0": 2}


def test_list_backbones_names_dynlab_nets_only() -> None:
    names = list_backbones()
    assert set(CIFAR_NAMES) <= set(names)
    assert "resnet18" not in names and names == sorted(names)


def test_every_timm_entry_point_of_dynlab_declares_its_capabilities() -> None:
    """An entry point registered with timm's plain `register_model` would escape the
    declarations (and so validation's pairing check): every one of dynlab's goes through
    `register_backbone`."""
    ours = {
        name
        for name in timm.list_models()
        if model_entrypoint(name).__module__.startswith("dynlab.backbones.")
    }
    assert ours == set(list_backbones())


def _takes_conv_options(name: str) -> bool:
    try:
        create_backbone(name, num_classes=10, conv="plain")
    except BackboneArgumentError:
        return False
    return True


@pytest.mark.parametrize("name", list_backbones())
def test_a_backbone_declares_exactly_the_capabilities_it_has(name: str) -> None:
    """Judged as their users judge them: the techniques' modules on the built network, the
    factory on the `conv` keyword. Built on the meta device: the ImageNet PruningNets hold
    hundreds of millions of generator parameters."""
    with torch.device("meta"):
        net = create_backbone(name, num_classes=10)
        has = {
            Capability.conv_act_options: _takes_conv_options(name),
            Capability.sparse_layers: bool(sparse_layers(net)),
            # As SPOS's module judges it: a one-shot space that measures its own MACs table.
            Capability.spos_supernet: callable(getattr(net, "macs_table", None)),
            Capability.dmasking_supernet: isinstance(net, FBNetV2Supernet),
            Capability.pruning_net: isinstance(net, PruningNet),
        }
    assert set(has) == set(Capability)
    assert backbone_capabilities(name) == {c for c, yes in has.items() if yes}


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZE))
def test_parameter_and_mac_counts_match_the_usual_figures(name: str) -> None:
    model = timm.create_model(name, num_classes=10).eval()
    (min_params, max_params), (min_macs, max_macs) = EXPECTED_SIZE[name]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert min_params <= params <= max_params
    assert min_macs <= count_macs(model, (3, 32, 32)) / 1e6 <= max_macs


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_timm_create_model_honours_num_classes_and_in_chans(name: str) -> None:
    model = timm.create_model(name, num_classes=7, in_chans=1).eval()
    assert model.num_classes == 7
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_forward_is_head_of_features_with_the_declared_shapes(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
        pre_logits = model.forward_head(features, pre_logits=True)
    size = FEATURE_SIZE[name]
    assert features.shape == (2, model.num_features, size, size)
    assert logits.shape == (2, 10)
    assert torch.allclose(logits, model.forward_head(features), atol=1e-5)
    assert pre_logits.shape == (2, model.num_features)
    assert torch.allclose(model.get_classifier()(pre_logits), logits, atol=1e-5)


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_vgg16_bn", "cifar_mobilenetv2"])
def test_reset_classifier_replaces_or_removes_the_linear_layer(name: str) -> None:
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(5)
    assert model.num_classes == 5
    assert model.get_classifier().out_features == 5
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_only_ordinary_or_depthwise_convs_and_no_linear_before_the_head(name: str) -> None:
    """S2DNAS splits every layer's channels into stages: forward_features must allow that."""
    model = timm.create_model(name, num_classes=10)
    feature_modules = [
        module
        for child_name, child in model.named_children()
        if child_name != "head"
        for module in child.modules()
    ]
    convs = [m for m in feature_modules if isinstance(m, nn.Conv2d)]
    assert convs
    assert all(c.groups in (1, c.in_channels) for c in convs)
    assert not any(isinstance(m, nn.Linear) for m in feature_modules)
    assert sum(isinstance(m, nn.Linear) for m in model.head.modules()) == 1


def test_resnet_downsampling_shortcuts_are_conv_bn_projections() -> None:
    """Option B of He et al. 2016: exactly the two stage transitions get a 1x1 conv shortcut."""
    model = timm.create_model("cifar_resnet56")
    projections = [
        m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    assert [(p.in_channels, p.out_channels, p.stride) for p in projections] == [
        (16, 32, (2, 2)),
        (32, 64, (2, 2)),
    ]
    assert len(model.stages) == 3 and all(len(stage) == 9 for stage in model.stages)


def test_mobilenetv2_residuals_follow_the_paper() -> None:
    """Sandler et al. 2018: a residual in every block with stride 1 and equal widths (10 of 17)."""
    model = timm.create_model("cifar_mobilenetv2")
    assert len(model.blocks) == 17
    assert sum(block.use_residual for block in model.blocks) == 10


def test_resnet_rejects_a_depth_that_is_not_6n_plus_2() -> None:
    from dynlab.backbones.cifar_resnet import CifarResNet

    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth=21)


def test_init_is_kaiming_for_convs_and_identity_for_batch_norm() -> None:
    torch.manual_seed(0)
    model = timm.create_model("cifar_vgg16_bn")
    conv, bn = model.features[-4], model.features[-3]  # the last 512->512 conv and its BN
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_drop_rate_reaches_the_head() -> None:
    model = timm.create_model("cifar_resnet20", drop_rate=0.3)
    assert model.head.drop.p == 0.3


def test_create_backbone_builds_dynlab_and_timm_models() -> None:
    resnet = create_backbone("cifar_resnet20", num_classes=4, in_chans=1).eval()
    assert resnet(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    timm_resnet = create_backbone("resnet18", num_classes=3).eval()
    assert type(timm_resnet).__module__.startswith("timm.")
    assert timm_resnet(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_unknown_backbone_message_lists_ours_suggests_close_timm_names_and_points_to_timm() -> None:
    with pytest.raises(UnknownBackboneError) as info:
        create_backbone("cifar_resnet57", num_classes=10)
    message = str(info.value)
    assert all(name in message for name in CIFAR_NAMES)
    assert "Did you mean: cifar_resnet56" in message
    assert "timm.list_models()" in message
    with pytest.raises(ValueError, match="Did you mean: .*resnet18"):
        create_backbone("resnet19", num_classes=10)


def test_is_known_backbone() -> None:
    assert is_known_backbone("cifar_resnet110")
    assert is_known_backbone("resnet18")
    assert not is_known_backbone("cifar_resnet57")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": -1}, "num_classes"),
        ({"num_classes": 10, "in_chans": 0}, "in_chans"),
        ({"num_classes": 10, "pretrained": True}, "pretrained"),
    ],
)
def test_create_backbone_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_backbone("cifar_resnet20", **kwargs)
