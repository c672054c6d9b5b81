"""The talk's blocks as backbone options: every backbone's deploy form equals its
training form, ACNet/RepVGG deploy to exactly the plain network's size, unsupported pairings are
refused with what works, and S2DNAS stages the blocks it can and refuses WeightNet by name."""

from __future__ import annotations

import itertools

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dynlab.backbones import create_backbone
from dynlab.building import build_datamodule, build_module
from dynlab.config import BackboneConfig
from dynlab.data.base import DataInfo
from dynlab.nn.dynamic import FReLU, WeightNetConv
from dynlab.nn.reparam import ACBlock, RepVGGBlock
from dynlab.protocol import StaticExits
from dynlab.techniques.s2dnas.analysis import UnsupportedBackboneError
from dynlab.techniques.s2dnas.config import S2DNASConfig
from dynlab.techniques.s2dnas.module import S2DNASModule
from dynlab.validation import ConfigError, check_input_size, validate_config
from tests.conftest import REPO, TINY, technique_config
from tests.test_fits import LEARN, _fit
from tests.test_reparam_blocks import inputs, randomize

SIZE = (3, 32, 32)
DIGITS = DataInfo("digits", 10, SIZE)

# (backbone, conv, act): every conv option and FReLU on each backbone family, each pairing once
DEPLOY_CASES = [
    ("cifar_resnet20", "acnet", "relu"),
    ("cifar_resnet20", "repvgg", "frelu"),
    ("cifar_resnet20", "weightnet", "relu"),
    ("cifar_resnet20", "plain", "frelu"),
    ("cifar_vgg16_bn", "repvgg", "relu"),
    ("cifar_vgg16_bn", "weightnet", "frelu"),
    ("cifar_mobilenetv2", "acnet", "frelu"),
    ("cifar_mobilenetv2", "repvgg", "relu6"),
    ("cifar_repvgg_a0", "repvgg", "relu"),
    ("cifar_repvgg_a0", "acnet", "frelu"),
    # WeightNet in the official placement (1x1 and depthwise convs, shared reduce), light FReLU
    ("weightnet_shufflenetv2_x0_5", "weightnet", "frelu_light"),
]


def build(name: str, conv: str, act: str, seed: int = 0) -> StaticExits:
    torch.manual_seed(seed)
    return StaticExits(create_backbone(name, num_classes=10, conv=conv, act=act))


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("name", "conv", "act"), DEPLOY_CASES)
def test_deploy_form_equals_the_training_form(name: str, conv: str, act: str) -> None:
    """In float64, so 1e-5 is a real bound even where random BN statistics blow activations up
    (a dropped branch or a misplaced kernel is off by O(1))."""
    net = randomize(build(name, conv, act), seed=1).double()
    deployed = net.deploy()
    leftover = [
        type(m).__name__
        for m in deployed.modules()
        if isinstance(m, ACBlock | RepVGGBlock | _BatchNorm)
        or (isinstance(m, FReLU) and not isinstance(m.bn, nn.Identity))
    ]
    assert not leftover, leftover  # every branch merged, every BN folded
    x = inputs((2, *SIZE), seed=2).double()
    with torch.no_grad():
        expected, actual = net(x), deployed(x)
    assert (actual - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())


# (backbone, its default activation)
@pytest.mark.parametrize(
    ("name", "act"),
    [("cifar_resnet20", "relu"), ("cifar_mobilenetv2", "relu6"), ("cifar_repvgg_a0", "relu")],
)
def test_reparameterised_blocks_deploy_to_exactly_the_plain_networks_size(
    name: str, act: str
) -> None:
    plain = build(name, "plain", act).deploy()
    plain_size = (params(plain), plain.exit_macs(SIZE))
    for conv in ("acnet", "repvgg"):
        net = build(name, conv, act)
        deployed = net.deploy()
        assert params(net) > plain_size[0] and net.exit_macs(SIZE)[0] > plain_size[1][0], conv
        assert (params(deployed), deployed.exit_macs(SIZE)) == plain_size, conv


def test_weightnet_and_frelu_cost_what_their_layers_add() -> None:
    """Neither re-parameterises away: WeightNet adds its generator (fc1, fc2) and the per-sample
    conv, FReLU one depthwise 3x3 per activation; both measured above the plain net."""
    plain = build("cifar_resnet20", "plain", "relu").deploy()
    weightnet = build("cifar_resnet20", "weightnet", "relu").deploy()
    frelu = build("cifar_resnet20", "plain", "frelu").deploy()
    base = plain.exit_macs(SIZE)[0]
    generators = [m for m in weightnet.modules() if isinstance(m, WeightNetConv)]
    assert len(generators) == 18  # every 3x3 conv of the 9 blocks, not the stem
    # each generator (fc1, fc2) takes the place of a static 3x3 kernel; biases are alike
    generated = sum(params(m.fc1) + params(m.fc2) for m in generators)
    static = sum(m.in_channels * m.out_channels * 9 for m in generators)
    assert params(weightnet) - params(plain) == generated - static
    assert weightnet.exit_macs(SIZE)[0] > base
    funnels = [m for m in frelu.modules() if isinstance(m, FReLU)]
    assert len(funnels) == 19  # the stem's and two per block
    # one depthwise 3x3 per funnel over its map: 16 channels at 32x32 for the stem and stage 1
    expected = sum(m.channels * 9 * (32 * 16 // m.channels) ** 2 for m in funnels)
    assert frelu.exit_macs(SIZE)[0] - base == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["backbone=cifar_mobilenetv2", "+backbone.kwargs.conv=weightnet"],
            r"conv=weightnet: it takes conv=plain\|acnet\|repvgg with act=relu6\|relu\|frelu",
        ),
        (
            ["+backbone.kwargs.act=relu6"],
            r"act=relu6: it takes conv=plain\|acnet\|repvgg\|weightnet with act=relu\|frelu",
        ),
        (
            ["backbone=cifar_spos_supernet_tiny", "+backbone.kwargs.conv=acnet"],
            "takes no argument 'conv'; backbones with conv/act options: .*cifar_resnet20",
        ),
    ],
)
def test_unsupported_pairings_are_refused_before_training(compose_cfg, overrides, message) -> None:
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError, match=message):
        check_input_size(cfg, DIGITS)


@pytest.mark.parametrize(
    ("name", "conv", "act"),
    [
        ("cifar_resnet20", "acnet", "relu"),
        ("cifar_resnet20", "repvgg", "frelu"),
        ("cifar_mobilenetv2", "repvgg", "relu6"),  # depthwise blocks, identity branches
    ],
)
def test_s2dnas_stages_the_blocks_and_merges_them_stage_by_stage(name, conv, act) -> None:
    """The S2D transformation splits every branch conv and BN by channel (its build-time check
    compares the stages with the backbone); the deploy form merges each block's branches per
    stage, so it costs what S2DNAS on the plain backbone costs, with the same outputs."""
    settings = {"split_points": [[2, 5]], "concat": [[True, False, True], [False, True, True]]}
    if name == "cifar_mobilenetv2":
        settings = {"split_points": [[3, 6]]}

    def s2d(conv: str) -> S2DNASModule:
        torch.manual_seed(0)
        backbone = BackboneConfig(name=name, kwargs={"conv": conv, "act": act})
        return S2DNASModule(technique_config(S2DNASConfig, **settings), backbone, DIGITS)

    net = randomize(s2d(conv).model, seed=3).double()
    deployed = net.deploy()
    assert not [m for m in deployed.modules() if isinstance(m, ACBlock | RepVGGBlock | _BatchNorm)]
    assert deployed.programs is not None  # every norm folded: each stage one flat program
    x = inputs((2, *SIZE), seed=4).double()
    with torch.no_grad():
        for expected, actual in zip(net.forward_exits(x), deployed.forward_exits(x), strict=True):
            assert (actual - expected).abs().max().item() < 1e-5 * max(
                1.0, expected.abs().max().item()
            )
    plain = s2d("plain").model.deploy()
    assert deployed.float().exit_macs(SIZE) == plain.exit_macs(SIZE)
    assert params(deployed) == params(plain)


def test_s2dnas_refuses_weightnet_by_name() -> None:
    backbone = BackboneConfig(name="cifar_resnet20", kwargs={"conv": "weightnet"})
    with pytest.raises(UnsupportedBackboneError, match="'stages.0.0.conv1' is WeightNet"):
        S2DNASModule(technique_config(S2DNASConfig), backbone, DIGITS)


@pytest.mark.slow
def test_dynamic_blocks_learn_on_digits(compose_cfg) -> None:
    """WeightNet's generated kernels and FReLU's funnels together, trained by the real app with
    the default recipe: far above chance (10 %) after two epochs, tested in the deploy form."""
    overrides = ["+backbone.kwargs.conv=weightnet", "+backbone.kwargs.act=frelu"]
    results = _fit(compose_cfg, [*LEARN, "technique=baseline", *overrides])
    assert results["metrics"]["test/top1"] > 70.0


@pytest.mark.parametrize("preset", ["digits", "resnet56_cifar10", "repvgg_cifar10"])
def test_every_run_of_the_block_sweeps_validates_and_builds(compose_cfg, preset: str) -> None:
    """Each job of a preset's sweep (the product of its sweeper params) composes, validates and
    builds its backbone on the dataset's image size."""
    params = OmegaConf.load(REPO / f"experiments/blocks/{preset}.yaml").hydra.sweeper.params
    keys = list(params)
    jobs = itertools.product(*(str(params[k]).split(",") for k in keys))
    for values in jobs:
        overrides = [f"{k}={v}" for k, v in zip(keys, values, strict=True)]
        cfg = compose_cfg([f"+experiment=blocks/{preset}", *overrides])
        validate_config(cfg)
        check_input_size(cfg, DataInfo(cfg.dataset.name, 10, SIZE))
        assert cfg.expected.paper and cfg.expected.dynlab


@pytest.mark.parametrize(
    ("technique", "extra"),
    [("baseline", []), ("gfnet", ["technique.patch_size=16", "technique.T=3"])],
)
def test_other_techniques_run_on_the_blocks_and_deploy_them(compose_cfg, technique, extra) -> None:
    """Blocks are backbone options: a technique builds its networks from them unchanged, and its
    deploy form merges them (no branch left) with the same exits."""
    overrides = ["+backbone.kwargs.conv=repvgg", "+backbone.kwargs.act=frelu", *extra]
    cfg = compose_cfg([*TINY, f"technique={technique}", *overrides])
    module = build_module(cfg, build_datamodule(cfg)).eval()
    net = randomize(module.model, seed=5).double()  # float64: random BN statistics blow up
    deployed = net.deploy()
    assert not [m for m in deployed.modules() if isinstance(m, RepVGGBlock | _BatchNorm)]
    x = inputs((2, *SIZE), seed=6).double()
    with torch.no_grad():
        for expected, actual in zip(net.forward_exits(x), deployed.forward_exits(x), strict=True):
            scale = max(1.0, expected.abs().max().item())
            assert (actual - expected).abs().max().item() < 1e-5 * scale
