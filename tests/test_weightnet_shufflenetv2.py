"""WeightNet where the official code puts it (every 1x1 and depthwise conv of ShuffleNetV2, one
shared reduced pooling per unit) and FReLU's light funnel: per-sample kernels equal a loop over
samples, the reduce layer is shared, BN folds, deploy forms are equal, published sizes hold."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dynlab.backbones import create_backbone
from dynlab.backbones.weightnet_shufflenetv2 import WeightNetShuffleNetV2, WeightNetShuffleUnit
from dynlab.evaluation.macs import count_macs
from dynlab.nn.blocks import activation
from dynlab.nn.dynamic import (
    FReLULight,
    WeightNetConv,
    WeightNetDWConv,
    WeightNetReduce,
    reduced_channels,
)
from dynlab.nn.fuse import fold_batchnorm
from dynlab.protocol import StaticExits
from tests.test_reparam_blocks import TOL, inputs, max_diff, randomize


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bn_eval(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """An eval-mode BatchNorm written out, so the tests do not trust the module under test."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


# ---- WeightNet's depthwise form and the pooled vector ------------------------------------------


@pytest.mark.parametrize(("channels", "k", "stride", "m", "g"), [(6, 3, 1, 2, 2), (4, 5, 2, 4, 2)])
def test_depthwise_weightnet_equals_a_loop_over_samples(channels, k, stride, m, g) -> None:
    """Sample b is convolved with its own depthwise kernel, fc2's channel-c group turning
    channel c's M / G gates into its k x k kernel (official `WeightNet_DW`)."""
    layer = WeightNetDWConv(channels, k, stride, M=m, G=g, bias=True).eval()
    with torch.no_grad():
        layer.bias.copy_(torch.randn(channels))
    x = inputs((5, channels, 9, 8), seed=1)
    with torch.no_grad():
        y = layer(x)
        kernels = layer.kernels(x)
        gates = torch.sigmoid(layer.fc1(x.mean(dim=(2, 3), keepdim=True)))
        per = m // g
        blocks = layer.fc2.weight.reshape(channels, k * k, per)
        by_hand = torch.einsum("bcj,crj->bcr", gates.reshape(5, channels, per), blocks)
        loop = torch.cat(
            [
                F.conv2d(x[b : b + 1], kernels[b][:, None], layer.bias, stride, k // 2, 1, channels)
                for b in range(5)
            ]
        )
        singles = torch.cat([layer(x[b : b + 1]) for b in range(5)])
    assert kernels.shape == (5, channels, k, k) and y.shape == loop.shape
    assert max_diff(kernels, by_hand.reshape(5, channels, k, k)) <= TOL
    assert max_diff(y, loop) <= TOL
    assert max_diff(y, singles) <= TOL
    assert (kernels[0] - kernels[1]).abs().max() > 1e-4  # the kernels do depend on the sample
    assert params(layer.fc2) == channels * k * k * m // g
    conv = channels * k * k * y.shape[2] * y.shape[3]  # the depthwise conv at batch 1
    fc1 = channels * (m // g * channels)
    fc2 = channels * k * k * m // g
    assert count_macs(layer, (channels, 9, 8)) == conv + fc1 + fc2


@pytest.mark.parametrize("layer_type", ["dense", "depthwise"])
def test_a_weightnet_conv_given_a_pooled_vector_reads_it_and_nothing_else(layer_type) -> None:
    """Built with `pooled_channels`, fc1 reads the vector it is given (not the input's mean):
    the kernels equal those of the same fcs fed that vector by hand, and they move with it."""
    reduce = WeightNetReduce(8)
    assert reduce.out_channels == reduced_channels(8) == 16
    if layer_type == "dense":
        layer: WeightNetConv | WeightNetDWConv = WeightNetConv(8, 6, 1, pooled_channels=16)
    else:
        layer = WeightNetDWConv(8, 3, pooled_channels=16)
    x = inputs((3, 8, 6, 6), seed=2)
    with torch.no_grad():
        pooled = reduce(x)
        expected = layer.fc2(torch.sigmoid(layer.fc1(pooled))).reshape(
            layer.kernels(x, pooled).shape
        )
        assert max_diff(layer.kernels(x, pooled), expected) <= TOL
        other = layer(x, pooled.flip(0))  # the same input, other samples' vectors
        assert (
            max_diff(
                other, torch.cat([layer(x[b : b + 1], pooled[2 - b : 3 - b]) for b in range(3)])
            )
            <= TOL
        )
        assert (other - layer(x, pooled)).abs().max() > 1e-4
    assert layer.fc1.in_channels == 16
    with pytest.raises(ValueError, match="call it as layer\\(x, pooled\\)"):
        layer(x)
    standalone = WeightNetDWConv(8, 3) if layer_type == "depthwise" else WeightNetConv(8, 6, 1)
    assert standalone.fc1.in_channels == 8  # dynlab's standalone form pools its own input
    with pytest.raises(ValueError, match="takes no pooled vector"):
        standalone(x, pooled)


def test_reduced_width_is_max_16_and_a_sixteenth() -> None:
    assert [reduced_channels(c) for c in (24, 256, 272, 992)] == [16, 16, 17, 62]


# ---- the official unit: one shared reduce ------------------------------------------------------


def unit_by_hand(unit: WeightNetShuffleUnit, x: Tensor) -> Tensor:
    """The official `ShuffleV2Block.forward` written out: ONE reduced pooling of the main branch's
    input, handed to every WeightNet conv of both branches."""
    passed, main = (x[:, 0::2], x[:, 1::2]) if unit.stride == 1 else (x, x)
    assert unit.reduce is not None
    pooled = unit.reduce.conv(main.mean(dim=(2, 3), keepdim=True))
    y = torch.relu(bn_eval(unit.pw1(main, pooled), unit.bn1))
    y = bn_eval(unit.dw(y, pooled), unit.bn2)
    y = torch.relu(bn_eval(unit.pw2(y, pooled), unit.bn3))
    if unit.proj is not None:
        p = bn_eval(unit.proj["dw"](passed, pooled), unit.proj["bn1"])
        passed = torch.relu(bn_eval(unit.proj["pw"](p, pooled), unit.proj["bn2"]))
    return torch.cat([passed, y], dim=1)


@pytest.mark.parametrize(("cin", "cout", "stride"), [(24, 48, 2), (48, 48, 1), (24, 56, 2)])
def test_every_weightnet_conv_of_a_unit_reads_the_one_shared_reduce(cin, cout, stride) -> None:
    unit = randomize(WeightNetShuffleUnit(cin, cout, stride, "weightnet", "relu"), seed=5)
    generated = [m for m in unit.modules() if isinstance(m, WeightNetConv | WeightNetDWConv)]
    assert len(generated) == (5 if stride == 2 else 3)
    assert sum(isinstance(m, WeightNetReduce) for m in unit.modules()) == 1
    assert unit.reduce is not None
    width = reduced_channels(cin if stride == 2 else cin // 2)
    assert unit.reduce.out_channels == width
    assert all(m.pooled_channels == width == m.fc1.in_channels for m in generated)
    calls = []
    unit.reduce.register_forward_hook(lambda *_: calls.append(1))
    x = inputs((3, cin, 10, 10), seed=6)
    with torch.no_grad():
        y = unit(x)
        assert len(calls) == 1  # pooled and reduced once per forward, not once per conv
        assert y.shape == (3, cout, 10 // stride, 10 // stride)
        assert max_diff(y, unit_by_hand(unit, x)) <= TOL * max(1.0, y.abs().max().item())
    unit.train()
    unit(x).square().mean().backward()
    assert unit.reduce.conv.weight.grad.abs().sum() > 0
    assert all(m.fc1.weight.grad.abs().sum() > 0 for m in generated)


def test_a_stride_one_unit_passes_its_even_channels_through() -> None:
    unit = randomize(WeightNetShuffleUnit(48, 48, 1, "weightnet", "relu"), seed=7)
    x = inputs((2, 48, 6, 6), seed=8)
    with torch.no_grad():
        assert torch.equal(unit(x)[:, :24], x[:, 0::2])


# ---- the registered networks --------------------------------------------------------------------

# official README, "+ WeightNet (1x)" rows: (params M, FLOPs M), printed to 0.1 M and 1 M
PUBLISHED = {"x0_5": (1.5, 41), "x1_0": (2.4, 139), "x1_5": (3.9, 301), "x2_0": (6.1, 562)}
# the README's ShuffleNetV2 rows, which are these same layouts with static convs
PUBLISHED_PLAIN = {"x0_5": (1.4, 41), "x1_0": (2.2, 138), "x1_5": (3.5, 299), "x2_0": (5.5, 557)}
# what dynlab counts (parameters, count_macs at 3x224x224) for weightnet / plain
COUNTED = {
    "x0_5": ((1_463_928, 40_704_040), (1_367_840, 40_476_448)),
    "x1_0": ((2_435_832, 138_534_120), (2_213_024, 137_610_912)),
    "x1_5": ((3_915_344, 301_097_064), (3_508_768, 298_970_656)),
    "x2_0": ((6_198_068, 561_367_920), (5_505_040, 557_269_648)),
}
# (size, conv, figure) where the official code's network does not round to the README's figure:
# 2.0x WeightNet counts 6.198 M / 561.4 M (README 6.1 M / 562 M), plain 0.5x 40.5 M MACs (41 M)
OFF_BY_ROUNDING = {("x2_0", "weightnet", "params"), ("x2_0", "weightnet", "macs")}
OFF_BY_ROUNDING |= {("x0_5", "plain", "macs")}


@pytest.mark.parametrize("size", sorted(PUBLISHED))
@pytest.mark.parametrize("conv", ["weightnet", "plain"])
def test_parameters_and_macs_are_the_published_ones(size: str, conv: str) -> None:
    """Equal to the README at its precision (0.1 M parameters, 1 M FLOPs), except the three
    figures of OFF_BY_ROUNDING, which are within 2 %; dynlab's exact counts are pinned."""
    with torch.device("meta"):
        shape_only = timm.create_model(f"weightnet_shufflenetv2_{size}", conv=conv)
    model = timm.create_model(f"weightnet_shufflenetv2_{size}", conv=conv)
    n, macs = params(model), count_macs(model, (3, 224, 224))
    assert params(shape_only) == n
    assert (n, macs) == COUNTED[size][conv == "plain"]
    published = (PUBLISHED if conv == "weightnet" else PUBLISHED_PLAIN)[size]
    for figure, counted, figure_published, digits in (
        ("params", n / 1e6, published[0], 1),
        ("macs", macs / 1e6, published[1], 0),
    ):
        if (size, conv, figure) in OFF_BY_ROUNDING:
            assert round(counted, digits) != figure_published
            assert counted == pytest.approx(figure_published, rel=0.02)
        else:
            assert round(counted, digits) == figure_published, figure


def test_macs_count_each_generated_conv_its_generator_and_the_reduce() -> None:
    """The rule the docstring states, checked on one unit: static conv of the same shape + fc1 +
    fc2 per WeightNet conv + the reduce conv; the plain unit counts the static convs alone."""
    unit = WeightNetShuffleUnit(24, 48, 2, "weightnet", "relu")
    plain = WeightNetShuffleUnit(24, 48, 2, "plain", "relu")
    generated = [m for m in unit.modules() if isinstance(m, WeightNetConv | WeightNetDWConv)]
    generators = sum(m.fc1.weight.numel() + m.fc2.weight.numel() for m in generated)
    assert unit.reduce is not None
    reduce = unit.reduce.conv.weight.numel()
    size = (24, 28, 28)
    assert count_macs(unit, size) == count_macs(plain, size) + generators + reduce


def test_the_network_runs_each_sample_with_its_own_kernels() -> None:
    """Batched forward equals one sample at a time (no cross-talk through the folded batch)."""
    torch.manual_seed(0)
    model = create_backbone("weightnet_shufflenetv2_x0_5", num_classes=10).eval()
    x = inputs((3, 3, 64, 64), seed=9)
    with torch.no_grad():
        batched = model(x)
        singles = torch.cat([model(x[b : b + 1]) for b in range(3)])
    assert batched.shape == (3, 10)
    assert max_diff(batched, singles) <= 1e-4 * max(1.0, batched.abs().max().item())


@pytest.mark.parametrize(("conv", "act"), [("weightnet", "relu"), ("plain", "frelu_light")])
def test_the_deploy_form_folds_every_bn_with_equal_outputs(conv: str, act: str) -> None:
    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "conv": conv, "act": act}
    net = StaticExits(create_backbone("weightnet_shufflenetv2_x0_5", **kwargs))
    net = randomize(net, seed=10).double()
    deployed = net.deploy()
    assert not [m for m in deployed.modules() if isinstance(m, _BatchNorm)]
    x = inputs((2, 3, 64, 64), seed=11).double()
    with torch.no_grad():
        expected, actual = net(x), deployed(x)
    assert (actual - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())


def test_block_options_are_checked() -> None:
    with pytest.raises(
        ValueError, match="conv=weightnet\\|plain with act=relu\\|frelu\\|frelu_light"
    ):
        create_backbone("weightnet_shufflenetv2_x1_0", num_classes=10, conv="acnet")
    with pytest.raises(ValueError, match="model_size"):
        WeightNetShuffleNetV2(model_size="3.0x")
    with torch.device("meta"):
        net = create_backbone("weightnet_shufflenetv2_x1_0", num_classes=10, act="frelu_light")
    lights = [m for m in net.modules() if isinstance(m, FReLULight)]
    assert len(lights) == 2 + 2 * 16 + 3  # stem, conv_last, two per unit, the projections
    # the CIFAR nets take the light funnel too, in every activation's place
    cifar = create_backbone("cifar_resnet20", num_classes=10, act="frelu_light")
    assert sum(isinstance(m, FReLULight) for m in cifar.modules()) == 1 + 2 * 9


# ---- FReLU's light funnel ----------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 5])
def test_frelu_light_is_max_of_x_and_two_parallel_funnels_and_deploys_equal(channels) -> None:
    """Official `shufflenetv2/frelu_light.py`: a 1x3 and a 3x1 depthwise conv BOTH read x, each
    with its own BN, summed; the deploy form folds each BN into its conv (the conv gains a bias)."""
    act = randomize(FReLULight(channels), seed=channels)
    assert isinstance(activation("frelu_light", channels), FReLULight)
    x = inputs((3, channels, 7, 9), seed=12)
    with torch.no_grad():
        y = act(x)
        h = F.conv2d(x, act.conv_h.weight, None, 1, (0, 1), 1, channels)
        v = F.conv2d(x, act.conv_v.weight, None, 1, (1, 0), 1, channels)
        funnel = bn_eval(h, act.bn_h) + bn_eval(v, act.bn_v)
        deployed = act.reparameterize()
        folded = copy.deepcopy(act)
        pairs = fold_batchnorm(folded)
    assert act.conv_h.kernel_size == (1, 3) and act.conv_v.kernel_size == (3, 1)
    assert max_diff(y, torch.maximum(x, funnel)) <= TOL
    assert (y > x).any() and (y == x).any()  # both sides of the max occur
    assert isinstance(deployed.bn_h, nn.Identity) and isinstance(deployed.bn_v, nn.Identity)
    assert isinstance(act.bn_h, nn.BatchNorm2d)  # the training form is left as it is
    assert max_diff(deployed(x), y) <= TOL
    assert deployed.reparameterize() is deployed
    assert sorted(pairs) == [("conv_h", "bn_h"), ("conv_v", "bn_v")]
    assert max_diff(folded(x), y) <= TOL and folded.reparameterize() is folded
    # 6 MACs per position and channel, in both forms (the 3x3 FReLU costs 9)
    assert count_macs(act, (channels, 7, 9)) == count_macs(deployed, (channels, 7, 9))
    assert count_macs(deployed, (channels, 7, 9)) == channels * 6 * 7 * 9
