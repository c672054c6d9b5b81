"""dynlab.backbones.condensenetv2 / sfr_shufflenetv2: registration, shapes, the official channel
counts, HS/SE placement, converted sizes against the official README, and conversion exactness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynlab.backbones import create_backbone, list_backbones
from dynlab.backbones.condensenetv2 import CondenseNetV2, DenseLayer, SELayer
from dynlab.backbones.sfr_shufflenetv2 import ShuffleUnit
from dynlab.evaluation.macs import count_macs
from dynlab.nn.condense import LearnedGroupConv, SparseFeatureReactivation

CIFAR = ["cifar_condensenetv2_110", "cifar_condensenetv2_146", "cifar_condensenetv2_tiny"]
IMAGENET = ["condensenetv2_a", "condensenetv2_b", "condensenetv2_c"]

# official notes §6: channels after the stem and after each block
IMAGENET_CHANNELS = {
    "condensenetv2_a": [16, 24, 32, 96, 288, 800],
    "condensenetv2_b": [12, 24, 72, 216, 600, 1176],
    "condensenetv2_c": [16, 48, 144, 400, 1040, 2064],
}


def condense_all(model: nn.Module) -> nn.Module:
    """Run every LGC/SFR's drops to the end and replace each by its deploy form, by name."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (LearnedGroupConv, SparseFeatureReactivation)):
            while int(module.drop_stage) < module.stages:
                module.drop()
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, module.condensed())
    return model


def block_outputs(model: CondenseNetV2, x: torch.Tensor) -> list[int]:
    """Channels after the stem and after each dense block (measured on a forward)."""
    x = model.stem(x)
    channels = [x.shape[1]]
    for block in model.blocks:
        x = block(x)
        channels.append(x.shape[1])
    return channels


def test_all_models_are_registered_as_dynlab_backbones() -> None:
    names = [*CIFAR, *IMAGENET, "sfr_shufflenetv2_x1_0", "cifar_sfr_shufflenetv2"]
    assert set(names) <= set(list_backbones())


@pytest.mark.parametrize("name", [*CIFAR, "cifar_sfr_shufflenetv2"])
def test_cifar_forward_shapes_and_timm_api(name: str) -> None:
    model = create_backbone(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert model(x).shape == (2, 10)
        assert features.shape[1] == model.num_features
        assert features.shape[2:] == (8, 8) if "condense" in name else (4, 4)
        pre = model.forward_head(features, pre_logits=True)
        assert model.get_classifier()(pre).shape == (2, 10)
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.num_classes == 7


@pytest.mark.parametrize("name", [*IMAGENET, "sfr_shufflenetv2_x1_0"])
def test_imagenet_forward_shape(name: str) -> None:
    model = create_backbone(name, num_classes=1000).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 224, 224))
        assert features.shape[2:] == (7, 7)
        assert model.forward_head(features).shape == (1, 1000)


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_channel_counts_follow_the_official_configs(name: str) -> None:
    model = create_backbone(name, num_classes=1000).eval()
    with torch.no_grad():
        assert block_outputs(model, torch.randn(1, 3, 64, 64)) == IMAGENET_CHANNELS[name]
    assert model.num_features == IMAGENET_CHANNELS[name][-1]


def test_hswish_from_block_2_and_se_from_block_3_on_imagenet() -> None:
    model = create_backbone("condensenetv2_a", num_classes=1000)
    for index, block in enumerate(model.blocks):
        for layer in (m for m in block if isinstance(m, DenseLayer)):
            expected = nn.Hardswish if index >= 2 else nn.ReLU
            assert isinstance(layer.conv_1.act, expected)
            assert isinstance(layer.sfr.act, expected)
            assert isinstance(layer.conv_2[1], expected)
            assert isinstance(layer.se, SELayer) == (index >= 3)
    # the final BN is followed by ReLU, the pooled features by SE(r=16) and fc by hard-swish
    assert isinstance(model.relu_last, nn.ReLU)
    assert model.se_last.fc[0].out_features == 800 // 16
    assert isinstance(model.fc_act, nn.Hardswish) and model.fc.out_features == 828


def test_sfr_bn_is_reset_to_one_like_the_official_initialize() -> None:
    model = create_backbone("cifar_condensenetv2_tiny", num_classes=10)
    sfr = model.blocks[0][0].sfr
    assert torch.equal(sfr.norm.weight, torch.ones_like(sfr.norm.weight))


# official README: (MACs in M, params in M) of the converted models
OFFICIAL_SIZE = {
    "cifar_condensenetv2_110": ((32, 32), 10, 41.0, 0.48),
    "cifar_condensenetv2_146": ((32, 32), 10, 62.0, 0.78),
    "condensenetv2_a": ((224, 224), 1000, 46.0, 2.0),
    "condensenetv2_b": ((224, 224), 1000, 146.0, 3.6),
    "condensenetv2_c": ((224, 224), 1000, 309.0, 6.1),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_SIZE))
def test_converted_size_matches_the_official_readme(name: str) -> None:
    """Parameters within 5 %; MACs within 15 % below (torch counts convs/linears only, the
    official counter also ReLU and pooling ops: about +4 % on ImageNet, +10 % on CIFAR)."""
    size, classes, macs, params = OFFICIAL_SIZE[name]
    model = condense_all(create_backbone(name, num_classes=classes).eval())
    measured_params = sum(p.numel() for p in model.parameters()) / 1e6
    measured_macs = count_macs(model, (3, *size)) / 1e6
    assert abs(measured_params / params - 1) < 0.05
    assert 0.85 < measured_macs / macs < 1.0


@pytest.mark.parametrize("name", ["cifar_condensenetv2_tiny", "cifar_sfr_shufflenetv2"])
def test_converted_model_gives_the_masked_models_logits(name: str) -> None:
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=10)
    model.train()
    with torch.no_grad():  # non-trivial BN statistics
        model(torch.randn(8, 3, 32, 32))
    for module in model.modules():
        if isinstance(module, (LearnedGroupConv, SparseFeatureReactivation)):
            while int(module.drop_stage) < module.stages:
                module.drop()
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        masked = model(x)
        converted = condense_all(model).eval()(x)  # new modules are built in train mode
    assert not any(
        isinstance(m, (LearnedGroupConv, SparseFeatureReactivation)) for m in model.modules()
    )
    torch.testing.assert_close(converted, masked, atol=1e-4, rtol=1e-4)


def test_sfr_shufflenet_adds_sfr_in_stride_1_units_only() -> None:
    model = create_backbone("cifar_sfr_shufflenetv2", num_classes=10)
    units = [m for m in model.modules() if isinstance(m, ShuffleUnit)]
    assert len(units) == 16
    assert all((u.sfr is None) == (u.stride == 2) for u in units)
    # SFR maps the branch output back onto the identity half
    unit = units[1]
    assert (unit.sfr.in_channels, unit.sfr.out_channels) == (58, 58)
    # and really is used: zeroing its conv changes the output
    unit.eval()
    x = torch.randn(1, 116, 8, 8)
    with torch.no_grad():
        before = unit(x)
        unit.sfr.conv.weight.zero_()
        assert not torch.allclose(before, unit(x))
