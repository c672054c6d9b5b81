"""The talk's blocks: ACNet and RepVGG re-parameterise to one conv with the same eval
outputs and fewer params/MACs; FReLU folds its BN; WeightNet's batched grouped conv equals a
per-sample loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dynlab.evaluation.macs import count_macs
from dynlab.nn.dynamic import FReLU, WeightNetConv, WeightNetDWConv
from dynlab.nn.fuse import fold_batchnorm, fold_bn_into_kernel
from dynlab.nn.reparam import ACBlock, RepVGGBlock

TOL = 1e-5


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random conv weights and BN affine/running statistics (fresh BNs are identity maps, under
    which a forgotten or misplaced branch could go unnoticed); returns the module in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.3)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
            elif isinstance(m, _BatchNorm):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return module.eval()


def inputs(shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# (in, out, kernel, stride, padding, groups); inputs are 9 x 10 so rows and columns differ
AC_SHAPES = [
    (4, 8, 3, 1, None, 1),
    (8, 8, 3, 2, None, 2),  # stride 2, groups
    (6, 4, 5, 1, None, 2),  # 5x5, in != out, groups
    (4, 6, 3, 1, 0, 1),  # padding < k // 2: the thin branches crop their input
    (4, 4, 5, 2, 1, 1),  # cropping with stride 2
    (3, 5, 3, 1, 2, 1),  # padding > k // 2: the thin branches pad their thin side
]


@pytest.mark.parametrize(("i", "o", "k", "s", "p", "g"), AC_SHAPES)
def test_acblock_reparameterized_equals_training_form(
    i: int, o: int, k: int, s: int, p: int | None, g: int
) -> None:
    block = randomize(ACBlock(i, o, k, stride=s, padding=p, groups=g), seed=k + s + g)
    x = inputs((3, i, 9, 10), seed=1)
    with torch.no_grad():
        y = block(x)
        conv = block.reparameterize()
        square_only = block.square_bn(block.square_conv(x))
    assert type(conv) is nn.Conv2d and conv.bias is not None
    assert conv.kernel_size == (k, k) and conv.stride == (s, s) and conv.groups == g
    assert max_diff(conv(x), y) <= TOL
    assert max_diff(square_only, y) > 0.1  # the thin branches count: the check can fail


def test_acblock_after_fold_batchnorm_and_in_train_mode() -> None:
    """Deploy folds the branch BNs first (fuse.fold_batchnorm); re-parameterising the folded
    block, or a block left in train mode, gives the same conv."""
    block = randomize(ACBlock(4, 6, 3, stride=2, groups=2), seed=3)
    x = inputs((2, 4, 8, 7), seed=2)
    with torch.no_grad():
        y = block(x)
        folded = copy.deepcopy(block)
        pairs = fold_batchnorm(folded)
        assert sorted(pairs) == [
            ("hor_conv", "hor_bn"),
            ("square_conv", "square_bn"),
            ("ver_conv", "ver_bn"),
        ]
        assert max_diff(folded.reparameterize()(x), y) <= TOL
        assert max_diff(block.train().reparameterize()(x), y) <= TOL
    assert block.training  # reparameterize leaves the block as it was


# (in, out, stride, groups)
REPVGG_SHAPES = [
    (8, 8, 1, 1),  # identity branch
    (8, 8, 1, 4),  # identity branch within groups
    (4, 8, 1, 1),  # in != out: no identity
    (8, 8, 2, 2),  # stride 2: no identity
    (6, 12, 2, 3),
]


@pytest.mark.parametrize(("i", "o", "s", "g"), REPVGG_SHAPES)
def test_repvgg_reparameterized_equals_training_form(i: int, o: int, s: int, g: int) -> None:
    block = randomize(RepVGGBlock(i, o, stride=s, groups=g), seed=i + o + s + g)
    assert (block.identity_bn is not None) == (i == o and s == 1)
    x = inputs((3, i, 9, 10), seed=4)
    with torch.no_grad():
        y = block(x)
        conv = block.reparameterize()
        dense_only = block.dense_bn(block.dense_conv(x))
        folded = copy.deepcopy(block)
        n_folded = len(fold_batchnorm(folded))
        from_folded = folded.reparameterize()(x)
    assert type(conv) is nn.Conv2d and conv.bias is not None
    assert conv.kernel_size == (3, 3) and conv.stride == (s, s) and conv.groups == g
    assert max_diff(conv(x), y) <= TOL
    assert max_diff(dense_only, y) > 0.1
    assert n_folded == 2  # the two conv branches; the identity BN reads no conv
    assert max_diff(from_folded, y) <= TOL


def test_repvgg_returns_the_sum_without_activation() -> None:
    """The block gives the branch sum, negative values included: the ReLU is the caller's."""
    block = randomize(RepVGGBlock(4, 4), seed=5)
    with torch.no_grad():
        y = block(inputs((2, 4, 6, 6), seed=6))
    assert (y < 0).any()


@pytest.mark.parametrize(
    ("block", "plain", "size"),
    [
        (ACBlock(8, 16, 3), nn.Conv2d(8, 16, 3, padding=1), (8, 10, 10)),
        (ACBlock(8, 8, 5, stride=2, groups=4), nn.Conv2d(8, 8, 5, 2, 2, groups=4), (8, 9, 9)),
        (RepVGGBlock(8, 8), nn.Conv2d(8, 8, 3, padding=1), (8, 10, 10)),
        (RepVGGBlock(8, 16, 2, 2), nn.Conv2d(8, 16, 3, 2, 1, groups=2), (8, 10, 10)),
    ],
    ids=["acb", "acb_k5_s2_g4", "repvgg_identity", "repvgg_s2_g2"],
)
def test_deploy_params_and_macs_below_training_form(
    block: nn.Module, plain: nn.Conv2d, size: tuple[int, int, int]
) -> None:
    deployed = randomize(block, seed=7).reparameterize()
    assert params(deployed) < params(block)
    assert params(deployed) == params(plain)
    deploy_macs = count_macs(deployed, size)
    assert deploy_macs < count_macs(block, size)
    assert deploy_macs == count_macs(plain, size)
    c_in, h, w = size
    oh, ow = plain(torch.zeros(1, *size)).shape[2:]
    k = plain.kernel_size[0]
    assert deploy_macs == plain.out_channels * (c_in // plain.groups) * k * k * oh * ow


def test_fold_bn_into_kernel_refuses_norms_without_running_statistics() -> None:
    kernel = torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="running statistics"):
        fold_bn_into_kernel(kernel, None, nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="running statistics"):
        fold_bn_into_kernel(kernel, None, nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match="5-channel norm"):
        fold_bn_into_kernel(kernel, None, nn.BatchNorm2d(5))


def test_invalid_block_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="odd kernel_size"):
        ACBlock(4, 4, kernel_size=4)
    with pytest.raises(ValueError, match="padding"):
        ACBlock(4, 4, padding=-1)
    with pytest.raises(ValueError, match="stride"):
        RepVGGBlock(4, 4, stride=0)
    with pytest.raises(ValueError, match="multiple of G"):
        WeightNetConv(4, 4, 3, M=3, G=2)
    with pytest.raises(ValueError, match="must divide"):
        WeightNetConv(3, 4, 1, M=2, G=2)  # in * k * k = 3 is not divisible by G = 2


@pytest.mark.parametrize("channels", [1, 6])
def test_frelu_keeps_shape_is_above_x_and_deploys_to_one_conv(channels: int) -> None:
    act = randomize(FReLU(channels), seed=channels)
    x = inputs((4, channels, 7, 9), seed=8)
    with torch.no_grad():
        y = act(x)
        funnel = act.bn(act.conv(x))
        deployed = act.reparameterize()
        folded = copy.deepcopy(act)
        pairs = fold_batchnorm(folded)
    assert y.shape == x.shape
    assert (y >= x).all()
    assert torch.equal(y, torch.maximum(x, funnel))
    assert (y > x).any() and (y == x).any()  # both sides of the max occur
    assert isinstance(deployed, FReLU) and isinstance(deployed.bn, nn.Identity)
    assert isinstance(act.bn, nn.BatchNorm2d)  # the training form is left as it is
    assert max_diff(deployed(x), y) <= TOL
    assert deployed.reparameterize() is deployed
    assert pairs == [("conv", "bn")] and max_diff(folded(x), y) <= TOL
    assert count_macs(deployed, (channels, 7, 9)) == channels * 9 * 7 * 9  # the depthwise 3x3


# (in, out, kernel, stride, M, G)
WN_SHAPES = [(4, 6, 3, 1, 2, 2), (4, 4, 3, 2, 2, 1), (6, 3, 1, 1, 1, 1), (2, 4, 3, 1, 4, 2)]


def reference_kernels(layer: WeightNetConv, x: Tensor) -> Tensor:
    """WeightNet's generated kernels written out with einsum: sample b's fc1 gates, split into
    G * out groups of M / G, each group's fc2 block mapping them to in * k * k / G entries."""
    groups, per_group = layer.G * layer.out_channels, layer.M // layer.G
    gates = torch.sigmoid(layer.fc1(x.mean(dim=(2, 3), keepdim=True))).reshape(
        x.shape[0], groups, per_group
    )
    blocks = layer.fc2.weight.reshape(groups, -1, per_group)
    k = layer.kernel_size
    entries = torch.einsum("bgj,grj->bgr", gates, blocks)
    return entries.reshape(x.shape[0], layer.out_channels, layer.in_channels, k, k)


@pytest.mark.parametrize(("i", "o", "k", "s", "m", "g"), WN_SHAPES)
def test_weightnet_equals_per_sample_loop(i: int, o: int, k: int, s: int, m: int, g: int) -> None:
    layer = WeightNetConv(i, o, k, stride=s, M=m, G=g).eval()
    x = inputs((5, i, 8, 7), seed=9)
    with torch.no_grad():
        y = layer(x)
        kernels = layer.kernels(x)
        loop = torch.cat(
            [F.conv2d(x[b : b + 1], kernels[b], stride=s, padding=k // 2) for b in range(5)]
        )
        singles = torch.cat([layer(x[b : b + 1]) for b in range(5)])
    assert kernels.shape == (5, o, i, k, k)
    assert max_diff(kernels, reference_kernels(layer, x)) <= TOL
    assert max_diff(y, loop) <= TOL
    assert max_diff(y, singles) <= TOL  # batch of 1 equals the batch of N sliced
    assert (kernels[0] - kernels[1]).abs().max() > 1e-4  # per-sample kernels do differ


def test_weightnet_m1_g1_is_a_gate_per_output_channel_on_a_static_kernel() -> None:
    """The SE-like extreme: sample b's kernel for channel o is sigmoid gate (b, o) times a fixed
    kernel, the fc2 rows of channel o."""
    layer = WeightNetConv(3, 4, 3, M=1, G=1)
    x = inputs((2, 3, 5, 5), seed=10)
    with torch.no_grad():
        gates = torch.sigmoid(layer.fc1(x.mean(dim=(2, 3), keepdim=True))).reshape(2, 4)
        static = layer.fc2.weight.reshape(4, 3, 3, 3)
        expected = gates[:, :, None, None, None] * static
        assert max_diff(layer.kernels(x), expected) <= TOL


def test_weightnet_trains_and_its_macs_count_generation() -> None:
    """Gradients reach both fcs; count_macs (batch 1) counts the conv plus fc1 and fc2."""
    i, o, k, m, g, hw = 4, 6, 3, 2, 2, 8
    layer = WeightNetConv(i, o, k, M=m, G=g)
    layer(inputs((3, i, hw, hw), seed=11)).square().mean().backward()
    assert layer.fc1.weight.grad.abs().sum() > 0 and layer.fc2.weight.grad.abs().sum() > 0
    conv = o * i * k * k * hw * hw
    fc1 = i * m * o
    fc2 = (m // g) * o * i * k * k
    assert count_macs(layer, (i, hw, hw)) == conv + fc1 + fc2


@pytest.mark.parametrize(
    ("layer", "channels"),
    [(lambda: WeightNetConv(4, 6, 3, stride=2), 4), (lambda: WeightNetDWConv(6, 3, 2), 6)],
    ids=["dense", "depthwise"],
)
def test_batchnorm_after_weightnet_folds_into_its_generator(layer, channels: int) -> None:
    net = randomize(nn.Sequential(layer(), nn.BatchNorm2d(6)), seed=12)
    x = inputs((3, channels, 8, 8), seed=13)
    with torch.no_grad():
        y = net(x)
        folded = copy.deepcopy(net)
        assert fold_batchnorm(folded) == [("0", "1")]
        assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None
        assert max_diff(folded(x), y) <= TOL


def test_deploy_form_of_a_net_with_reparam_blocks_is_plain_convs_with_equal_outputs() -> None:
    """DynamicNet.deploy folds BN, then converts every ACNet/RepVGG block and FReLU."""
    from dynlab.evaluation.macs import count_macs
    from dynlab.protocol import StaticExits

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        FReLU(8),
        ACBlock(8, 16, stride=2),
        nn.ReLU(),
        RepVGGBlock(16, 16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model = StaticExits(net).eval()
    deployed = model.deploy()
    kinds = {type(m) for m in deployed.modules()}
    assert not kinds & {ACBlock, RepVGGBlock, nn.BatchNorm2d}
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-5)
    assert count_macs(deployed, (3, 16, 16)) < count_macs(model, (3, 16, 16))
    assert sum(p.numel() for p in deployed.parameters()) < sum(p.numel() for p in net.parameters())


def test_deploy_reparameterizes_timm_repvgg_in_place_with_equal_outputs() -> None:
    """timm's RepVGG blocks convert themselves (their reparameterize() returns None)."""
    from dynlab.backbones import create_backbone
    from dynlab.protocol import StaticExits

    torch.manual_seed(0)
    model = StaticExits(create_backbone("repvgg_a0", num_classes=10)).eval()
    deployed = model.deploy()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-3, atol=1e-4)
    assert sum(p.numel() for p in deployed.parameters()) < sum(
        p.numel() for p in model.parameters()
    )
