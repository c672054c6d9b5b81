"""dynlab.backbones.spos_shufflenetv2: the SPOS ShuffleNetV2 space, its supernet, standalone nets
and measured MACs table (Guo et al. 2020; official megvii-model/SinglePathOneShot)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from dynlab.backbones import create_backbone
from dynlab.backbones.spos_shufflenetv2 import (
    BLOCKS,
    CHANNEL_SCALES,
    OFFICIAL_ARCH,
    MacsTable,
    SearchSpace,
    SPOSNet,
    SPOSSupernet,
    mid_channels,
)
from dynlab.evaluation.macs import count_macs
from dynlab.nn.fuse import fold_batchnorm

# A small space of the same structure: 5 layers, every stage wider than the one before.
SMALL = {
    "stage_repeats": (1, 1, 2, 1),
    "widths": (16, 32, 64, 128),
    "stem_channels": 8,
    "last_channels": 64,
    "num_classes": 10,
}
SIZE = (3, 16, 16)
IMAGENET = (3, 224, 224)


def _random_genes(space: SearchSpace, rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.randrange(n) for n in space.gene_choices())


def _extreme_genes(table: MacsTable, pick) -> tuple[int, ...]:
    """Per layer, the (block, scale) whose table entry `pick` (min/max) chooses."""
    choices = [
        pick(
            ((b, s) for b, row in enumerate(blocks) for s in range(len(row))),
            key=lambda bs, blocks=blocks: blocks[bs[0]][bs[1]],
        )
        for blocks in table.layers
    ]
    arch = tuple(b for b, _ in choices)
    return arch + (tuple(s for _, s in choices) if table.space.num_scales else ())


@pytest.mark.parametrize("channel_search", [False, True])
def test_macs_table_sums_to_count_macs_of_the_standalone_nets(channel_search: bool) -> None:
    supernet = SPOSSupernet(**SMALL, channel_search=channel_search)
    table = MacsTable.measure(supernet, SIZE)
    assert (
        table.to_dict()
        == MacsTable.measure({**SMALL, "channel_search": channel_search}, SIZE).to_dict()
    )
    rng = random.Random(0)
    for _ in range(4):
        genes = _random_genes(supernet.space, rng)
        net = supernet.standalone(genes)
        assert table.macs(genes) == count_macs(net, SIZE), genes
    cheapest, dearest = _extreme_genes(table, min), _extreme_genes(table, max)
    assert table.minimum() == count_macs(supernet.standalone(cheapest), SIZE)
    assert table.maximum() == count_macs(supernet.standalone(dearest), SIZE)
    assert table.minimum() < table.macs(genes) < table.maximum()
    again = MacsTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again.macs(genes) == table.macs(genes) and again.space == table.space
    with pytest.raises(ValueError, match="expected"):
        table.macs(genes[:-1])


def test_imagenet_anchors_match_the_official_readme_and_the_paper() -> None:
    """Official README: (2,1,0,1,2,0,2,0,2,0,2,3,0,0,0,0,3,2,3,3) has 323M FLOPs, 3.5M params."""
    table = MacsTable.measure({}, IMAGENET)
    official, shuffle3, xception = (
        table.macs(OFFICIAL_ARCH),
        table.macs((0,) * 20),
        table.macs((3,) * 20),
    )
    with torch.device("meta"):
        net = SPOSNet()
    params = sum(p.numel() for p in net.parameters())
    print(
        f"\nSPOS at 224: official {official / 1e6:.2f}M MACs {params / 1e6:.3f}M params, "
        f"all 3x3 {shuffle3 / 1e6:.2f}M, all Xception {xception / 1e6:.2f}M, "
        f"space {table.minimum() / 1e6:.2f}..{table.maximum() / 1e6:.2f}M"
    )
    assert official == pytest.approx(323e6, rel=0.02)
    assert params == pytest.approx(3.5e6, rel=0.02)
    assert shuffle3 == pytest.approx(296e6, rel=0.02)
    assert xception == pytest.approx(359e6, rel=0.02)
    assert count_macs(net, IMAGENET) == official  # the whole net, BN included, on meta
    with_scales = MacsTable.measure({"channel_search": True}, IMAGENET)
    assert with_scales.macs(OFFICIAL_ARCH + (CHANNEL_SCALES.index(1.0),) * 20) == official
    assert with_scales.minimum() < table.minimum() < table.maximum() < with_scales.maximum()


def _train_bn_statistics(supernet: SPOSSupernet, steps: int = 3) -> None:
    """Some training-mode forwards on random paths, so the BN running stats are not the init."""
    rng = random.Random(1)
    supernet.train()
    with torch.no_grad():
        for _ in range(steps):
            supernet.set_path(_random_genes(supernet.space, rng))
            supernet(torch.randn(4, *SIZE) * 2 + 0.5)


@pytest.mark.parametrize("channel_search", [False, True])
def test_child_in_eval_mode_computes_what_the_supernet_computes(channel_search: bool) -> None:
    torch.manual_seed(0)
    supernet = SPOSSupernet(**SMALL, channel_search=channel_search)
    _train_bn_statistics(supernet)
    supernet.eval()
    x = torch.randn(3, *SIZE)
    layers = supernet.space.num_layers
    paths = [(3, 2, 1, 0, 3), OFFICIAL_ARCH[:layers]]
    if channel_search:
        paths = [paths[0] + (0,) * layers, paths[1] + (9, 0, 4, 2, 7)]
    for genes in paths:
        supernet.set_path(genes)
        expected = supernet(x)
        child = supernet.child(genes).eval()
        assert supernet.path == genes  # cutting a child leaves the path alone
        assert isinstance(child, SPOSNet) and child.genes == genes
        torch.testing.assert_close(child(x), expected, atol=1e-5, rtol=1e-5)
        fresh = supernet.standalone(genes)  # same layers and widths; affine BN adds parameters
        bn_names = {
            f"{n}.{p}"
            for n, m in fresh.named_modules()
            if isinstance(m, nn.BatchNorm2d)
            for p in ("weight", "bias")
        }
        assert {n: p.shape for n, p in child.named_parameters()} == {
            n: p.shape for n, p in fresh.named_parameters() if n not in bn_names
        }
        fold_batchnorm(child)  # the deploy conversion: plain conv/BN pairs only
        assert not any(isinstance(m, nn.BatchNorm2d) for m in child.modules())
        torch.testing.assert_close(child(x), expected, atol=1e-4, rtol=1e-4)
    bns = [m for m in supernet.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(bn.affine for bn in bns)
    assert all(
        m.affine for m in supernet.standalone(genes).modules() if isinstance(m, nn.BatchNorm2d)
    )


def test_a_narrow_path_uses_and_updates_only_its_slice_of_the_widest_block() -> None:
    supernet = SPOSSupernet(**SMALL, channel_search=True)
    layers = supernet.space.num_layers
    genes = (0,) * layers + (0,) * layers  # 0.2x everywhere
    supernet.set_path(genes)
    first = supernet.layers[0][0].main[0]  # pw into the mid width, built at 2.0x
    base = supernet.specs[0].base_mid
    assert first.conv.out_channels == mid_channels(base, len(CHANNEL_SCALES) - 1) == 2 * base
    narrow = mid_channels(base, 0)
    assert narrow == max(1, int(base * CHANNEL_SCALES[0]))
    supernet.train()(torch.randn(4, *SIZE))
    assert (first.bn.running_mean[:narrow] != 0).all()
    assert (first.bn.running_mean[narrow:] == 0).all()
    assert (first.bn.running_var[narrow:] == 1).all()
    child = supernet.child(genes)
    assert child.layers[0].main[0].conv.out_channels == narrow


def test_stride_one_layers_pass_the_even_channels_through_as_official() -> None:
    """Official blocks.py `channel_shuffle`: even channels bypass, odd ones enter the branch."""
    supernet = SPOSSupernet(**SMALL).eval()
    stride_one = [i for i, spec in enumerate(supernet.specs) if spec.stride == 1]
    assert stride_one == [3]
    x = torch.randn(2, 64, 4, 4)
    for block in supernet.layers[3]:
        out = block(x)
        assert out.shape == x.shape
        torch.testing.assert_close(out[:, :32], x[:, 0::2], atol=0, rtol=0)
        x_odd_changed = x.clone()
        x_odd_changed[:, 0::2] += 1  # the branch reads the odd channels only
        torch.testing.assert_close(block(x_odd_changed)[:, 32:], out[:, 32:], atol=0, rtol=0)
    first = supernet.layers[0][3]  # stride 2: projection of all 8 input channels, then 8 more
    assert first.proj is not None and first(torch.randn(2, 8, 8, 8)).shape == (2, 16, 4, 4)
    assert first.proj[1].conv.out_channels == 8 and first.main[-1].conv.out_channels == 8


def test_backward_reaches_the_sampled_choices_only() -> None:
    torch.manual_seed(0)
    supernet = SPOSSupernet(**SMALL, channel_search=True).train()
    layers = supernet.space.num_layers
    arch, scales = (1, 3, 0, 2, 3), (2, 9, 4, 0, 6)
    supernet.set_path(arch + scales)
    supernet(torch.randn(4, *SIZE)).square().sum().backward()
    for layer in range(layers):
        for block in range(len(BLOCKS)):
            params = supernet.layer_params(layer, block)
            assert params
            if block == arch[layer]:
                assert all(p.grad is not None for p in params), (layer, block)
            else:
                assert all(p.grad is None for p in params), (layer, block)
    # Within a sampled block, only the first `mid` output rows of the widest pw conv learn.
    pw = supernet.layers[0][1].main[0].conv.weight.grad
    mid = mid_channels(supernet.specs[0].base_mid, scales[0])
    assert pw[:mid].abs().sum() > 0 and (pw[mid:] == 0).all()
    assert supernet.stem[0].weight.grad is not None


def test_space_and_set_path_refuse_bad_candidates_naming_the_expected_shape() -> None:
    space = SearchSpace(num_layers=5, num_scales=len(CHANNEL_SCALES))
    assert space.gene_choices() == [4] * 5 + [10] * 5
    assert space.default_scales() == (4,) * 5 and SearchSpace(5).default_scales() is None
    assert space.split((1, 2, 3, 0, 1, 9, 8, 7, 6, 5)) == ((1, 2, 3, 0, 1), (9, 8, 7, 6, 5))
    assert SearchSpace(3).split((1, 2, 3)) == ((1, 2, 3), None)
    assert space.problem((0,) * 10) is None
    assert "expected 10 genes" in space.problem((0,) * 9)
    assert "0..3" in space.problem((4,) + (0,) * 9)
    assert "0..9" in space.problem((0,) * 9 + (10,))
    assert "gene 2" in space.problem((0, 0, 1.0) + (0,) * 7)
    supernet = SPOSSupernet(**SMALL)
    assert supernet.path == (0,) * 5
    assert SPOSSupernet(**SMALL, channel_search=True).path == (0,) * 5 + (4,) * 5
    with pytest.raises(ValueError, match="expected 5 genes"):
        supernet.set_path((0,) * 6)
    with pytest.raises(ValueError, match=r"gene 1 .* is 4, expected an int in 0\.\.3"):
        supernet.set_path((0, 4, 0, 0, 0))
    with pytest.raises(ValueError, match="expected 5 genes"):
        supernet.child((0,) * 4)
    with pytest.raises(ValueError, match="0..3"):
        SPOSNet(arch=(0, 0, 0, 0, 7), **SMALL)
    with pytest.raises(ValueError, match="wider than the one before"):
        SPOSSupernet(widths=(16, 16, 32, 64), stem_channels=16, stage_repeats=(1, 1, 1, 1))


def test_timm_builds_the_registered_nets_with_the_classifier_api() -> None:
    supernet = create_backbone("cifar_spos_supernet", num_classes=10, in_chans=1)
    assert isinstance(supernet, SPOSSupernet) and supernet.space.num_layers == 20
    x = torch.randn(2, 1, 8, 8)  # strides reach 1x1 maps and stay there
    supernet.set_path(OFFICIAL_ARCH)
    supernet.eval()
    out = supernet(x)
    assert out.shape == (2, 10)
    torch.testing.assert_close(out, supernet.forward_head(supernet.forward_features(x)))
    fc = supernet.get_classifier()
    assert isinstance(fc, nn.Linear) and fc.bias is None and fc.out_features == 10
    supernet.reset_classifier(3)
    assert supernet.get_classifier().bias is None and supernet(x).shape == (2, 3)
    signature = supernet.signature()
    assert json.loads(json.dumps(signature)) == signature
    assert signature["cifar_stem"] and signature["in_chans"] == 1 and signature["num_classes"] == 3
    assert signature["widths"] == [64, 160, 320, 640] and not signature["channel_search"]
    net = create_backbone("spos_shufflenetv2", num_classes=1000)
    assert isinstance(net, SPOSNet) and net.arch == OFFICIAL_ARCH and net.stem[0].stride == (2, 2)
    assert all(m.affine for m in net.modules() if isinstance(m, nn.BatchNorm2d)) and not any(
        isinstance(m, nn.MaxPool2d) for m in net.modules()
    )
    space = {k: v for k, v in SMALL.items() if k != "num_classes"}
    with pytest.raises(ValueError, match="give `arch`"):
        create_backbone("cifar_spos_shufflenetv2", num_classes=10, **space)
    small = create_backbone(
        "cifar_spos_shufflenetv2",
        num_classes=10,
        arch=[3, 2, 1, 0, 1],
        scales=[0, 9, 4, 4, 2],
        **space,
    )
    assert small.genes == (3, 2, 1, 0, 1, 0, 9, 4, 4, 2) and small.signature()["channel_search"]
    assert small.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_the_small_space_brackets_a_quarter_and_half_of_resnet20s_macs_on_grey_32x32() -> None:
    """cifar_spos_supernet_small (channel search on by default) spans about 10 M and 20 M MACs at
    1x32x32 with margin (CIFAR ResNet-20: 40.5 M); the ends are what count_macs measures."""
    supernet = create_backbone("cifar_spos_supernet_small", num_classes=10, in_chans=1)
    assert isinstance(supernet, SPOSSupernet) and supernet.space.num_scales == len(CHANNEL_SCALES)
    table = MacsTable.measure(supernet, (1, 32, 32))
    assert table.minimum() <= 6e6 and table.maximum() >= 28e6  # measured 5.17 M and 30.95 M
    for pick, macs in ((min, table.minimum()), (max, table.maximum())):
        net = supernet.standalone(_extreme_genes(table, pick)).eval()
        assert count_macs(net, (1, 32, 32)) == macs
    assert sum(p.numel() for p in supernet.parameters()) < 2.5e6
    # Without channel search the four blocks alone span far less than 10-20 M.
    blocks_only = MacsTable.measure({**supernet.config, "channel_search": False}, (1, 32, 32))
    assert blocks_only.maximum() / blocks_only.minimum() < 1.7
