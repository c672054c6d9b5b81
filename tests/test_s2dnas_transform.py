"""The S2D transformation: stage slices, equivalence with the original, MACs, early exit, rejections."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dynlab.backbones import create_backbone
from dynlab.config import BackboneConfig
from dynlab.data.base import DataInfo
from dynlab.evaluation.macs import count_macs
from dynlab.techniques.s2dnas.analysis import UnsupportedBackboneError, analyse_backbone
from dynlab.techniques.s2dnas.config import S2DNASConfig
from dynlab.techniques.s2dnas.layers import StagedBatchNorm2d, StagedConv2d, StageRun
from dynlab.techniques.s2dnas.model import S2DNet
from dynlab.techniques.s2dnas.module import S2DNASModule
from dynlab.techniques.s2dnas.settings import S2DSettings, SettingsError, resolve_settings
from dynlab.techniques.s2dnas.transform import stage_bounds

from .conftest import technique_config

SIZE = (3, 32, 32)
DIGITS = DataInfo("digits", 10, SIZE)


def transform(
    name: str = "cifar_resnet20",
    num_stages: int = 3,
    groups: int = 8,
    split_points: list[list[int]] | None = None,
    concat: list[list[bool]] | None = None,
    net: nn.Module | None = None,
) -> S2DNet:
    net = net if net is not None else create_backbone(name, num_classes=10, in_chans=3)
    layout = analyse_backbone(net, SIZE, name)
    settings = resolve_settings(split_points, concat, num_stages, layout.num_layer_groups, groups)
    return S2DNet(net, layout, settings, groups, SIZE)


@pytest.mark.parametrize(
    ("channels", "points", "groups"),
    [(16, (2, 5), 8), (24, (1, 2, 3), 16), (64, (4,), 8), (10, (1, 9), 10)],
)
def test_stage_slices_partition_the_channels(
    channels: int, points: tuple[int, ...], groups: int
) -> None:
    bounds = stage_bounds(channels, points, groups)
    covered = [c for lo, hi in bounds for c in range(lo, hi)]
    assert covered == list(range(channels))
    assert all(hi > lo for lo, hi in bounds)
    assert len(bounds) == len(points) + 1


def test_one_stage_is_exactly_the_original_network() -> None:
    torch.manual_seed(0)
    original = create_backbone("cifar_resnet20", num_classes=10, in_chans=3)
    with torch.no_grad():  # non-trivial BN statistics, so a wrong slice would show
        for m in original.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    net = transform(num_stages=1, net=copy.deepcopy(original))
    x = torch.randn(4, *SIZE)
    original.eval(), net.eval()
    with torch.no_grad():
        (logits,) = net.forward_exits(x)
        torch.testing.assert_close(logits, original(x), rtol=1e-5, atol=1e-5)


def test_exit_macs_increase_and_stay_within_the_static_model_plus_heads() -> None:
    net = transform()
    static = count_macs(create_backbone("cifar_resnet20", num_classes=10, in_chans=3), SIZE)
    heads = sum(head.in_features * head.out_features for head in net.heads)
    macs = net.exit_macs(SIZE)
    assert len(macs) == 3
    assert macs[0] < macs[1] < macs[2] <= static + heads
    assert macs[0] < static / 3  # the first stage is a thin slice


def test_layers_of_one_feature_map_size_share_split_points() -> None:
    net = transform(split_points=[[1, 2], [3, 6], [5, 7]])
    layout = net.layout
    assert layout.group_sizes == (((32, 32),), ((16, 16),), ((8, 8),))
    fractions: dict[int, set] = {}
    for conv in layout.convs:
        bounds = net.plan.convs[conv.name].out_bounds
        fractions.setdefault(conv.out_group, set()).add(
            tuple(hi / conv.out_channels for _, hi in bounds)
        )
    for norm in layout.norms:
        fractions[norm.group].add(tuple(hi / norm.channels for _, hi in net.plan.norms[norm.name]))
    assert fractions == {
        0: {(1 / 8, 2 / 8, 1.0)},
        1: {(3 / 8, 6 / 8, 1.0)},
        2: {(5 / 8, 7 / 8, 1.0)},
    }


def _stage2_features_before_last_conv(net: S2DNet, x: torch.Tensor) -> torch.Tensor:
    """Stage 2's input to the network's last conv (the one conv that always concatenates)."""
    last = net.backbone.get_submodule(net.layout.convs[-1].name)
    seen = []
    handle = last.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    run = StageRun(x)
    net._advance(run), net._advance(run)
    handle.remove()
    return seen[1]


@pytest.mark.parametrize("concat", [False, True])
def test_concat_off_never_reads_earlier_stages(concat: bool) -> None:
    torch.manual_seed(0)
    net = transform(num_stages=2, concat=[[concat]]).eval()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        before = _stage2_features_before_last_conv(net, x)
        for module in net.modules():  # perturb everything stage 1 computes
            if isinstance(module, StagedConv2d):
                module.weights[0].add_(torch.randn_like(module.weights[0]))
        after = _stage2_features_before_last_conv(net, x)
    assert torch.equal(before, after) is (not concat)


def test_exit_session_with_keep_matches_forward_exits() -> None:
    torch.manual_seed(0)
    net = transform().eval()
    x = torch.randn(6, *SIZE)
    with torch.no_grad():
        full = net.forward_exits(x)
        session = net.exit_session(x)
        kept = torch.arange(6)
        torch.testing.assert_close(session.next_exit(), full[0])
        for k, mask in [
            (1, torch.tensor([True, False, True, True, False, True])),
            (2, torch.tensor([False, True, True, False])),
        ]:
            session.keep(mask)
            kept = kept[mask]
            torch.testing.assert_close(session.next_exit(), full[k][kept], rtol=1e-4, atol=1e-5)
        with pytest.raises(RuntimeError, match="all 3 stages"):
            session.next_exit()


def test_batchnorm_updates_only_its_stage_slice_of_the_running_statistics() -> None:
    net = transform(num_stages=2).train()
    norm = next(m for m in net.modules() if isinstance(m, StagedBatchNorm2d))
    before = norm.running_mean.clone()
    net.cursor.run = StageRun(torch.zeros(1, *SIZE))  # stage 1 only
    norm(torch.randn(4, norm.bounds[0][1], 8, 8) + 3.0)
    net.cursor.run = None
    lo, hi = norm.bounds[0]
    assert not torch.equal(norm.running_mean[lo:hi], before[lo:hi])
    assert torch.equal(norm.running_mean[hi:], before[hi:])


@pytest.mark.parametrize("name", ["cifar_mobilenetv2", "cifar_vgg16_bn", "resnet18"])
def test_other_backbones_transform_and_run(name: str) -> None:
    net = transform(name)
    logits = net.forward_exits(torch.randn(2, *SIZE))
    assert [tuple(z.shape) for z in logits] == [(2, 10)] * 3
    sum(z.sum() for z in logits).backward()  # every kept weight block is used and trainable
    assert all(p.grad is not None for p in net.parameters())


MAPS = {n: (n, n) for n in (32, 16, 8, 4, 2, 1)}


@pytest.mark.parametrize(
    ("name", "sizes"),
    [
        ("cifar_resnet20", (32, 16, 8)),
        ("cifar_vgg16_bn", (32, 16, 8, 4, 2)),  # the last max-pool's 1x1 map has no conv
        ("cifar_mobilenetv2", (32, 16, 8, 4)),  # its stride-2 convs are depthwise
    ],
)
def test_every_map_size_a_dense_conv_produces_is_its_own_layer_group(
    name: str, sizes: tuple[int, ...]
) -> None:
    layout = analyse_backbone(create_backbone(name, num_classes=10), SIZE, name)
    assert layout.group_sizes == tuple((MAPS[n],) for n in sizes)
    assert layout.out_group == len(sizes) - 1
    for conv in layout.convs:
        if conv.depthwise:  # channel c reads channel c: one partition in and out
            assert conv.in_group == conv.out_group


def test_convs_read_the_partition_of_the_layer_that_produced_their_input() -> None:
    """A size-changing channel-local op (max-pool, strided depthwise conv) passes its input's
    partition on: the conv after it reads the previous map size's layer group."""
    vgg = analyse_backbone(create_backbone("cifar_vgg16_bn", num_classes=10), SIZE, "vgg")
    convs = {c.name: c for c in vgg.convs}
    # features.7 is the first conv after the first max-pool (16x16), features.40 the last conv
    assert (convs["features.7"].in_group, convs["features.7"].out_group) == (0, 1)
    assert (convs["features.40"].in_group, convs["features.40"].out_group) == (4, 4)
    mbv2 = analyse_backbone(create_backbone("cifar_mobilenetv2", num_classes=10), SIZE, "mbv2")
    convs = {c.name: c for c in mbv2.convs}
    # blocks.3: expand 1x1 at 32x32, depthwise 3x3 stride 2 to 16x16, project 1x1 at 16x16
    assert [(convs[f"blocks.3.conv.{i}"].in_group, convs[f"blocks.3.conv.{i}"].out_group)
            for i in (0, 3, 6)] == [(0, 0), (0, 0), (0, 1)]  # fmt: skip
    norms = {n.name: n.group for n in mbv2.norms}
    assert [norms[f"blocks.3.conv.{i}"] for i in (1, 4, 7)] == [0, 0, 1]


POINTS = [[1, 3], [2, 5], [4, 6], [3, 7], [5, 6]]  # a different pair for every layer group


@pytest.mark.parametrize(
    ("name", "kwargs", "sizes"),
    [
        ("cifar_vgg16_bn", {}, ((32,), (16,), (8,), (4,), (2,))),
        ("cifar_mobilenetv2", {}, ((32,), (16,), (8,), (4,))),
        # ACNet branch sums and FReLU's max outside modules keep the depthwise convs' partition
        ("cifar_mobilenetv2", {"conv": "acnet", "act": "frelu"}, ((32,), (16,), (8,), (4,))),
        # FReLU's light funnel: two parallel depthwise convs summed, each staged like the rest
        ("cifar_resnet20", {"act": "frelu_light"}, ((32,), (16,), (8,))),
        # RepVGG's identity branch adds the last max-pool's map (partition of 4x4) to the 2x2
        # convs' outputs: one layer group, or its stages would add mismatched slices
        ("cifar_vgg16_bn", {"conv": "repvgg"}, ((32,), (16,), (8,), (4, 2))),
        # timm's first stage adds the stem's max-pooled map (partition of 16x16) to its 8x8 maps
        ("resnet18", {}, ((16, 8), (4,), (2,), (1,))),
    ],
)
def test_s2dnas_builds_with_different_split_points_per_layer_group(
    name: str, kwargs: dict, sizes: tuple[tuple[int, ...], ...]
) -> None:
    """The build-time check (stages == masked backbone) passes with every layer group cut at its
    own points, and every BN takes its own group's points."""
    points = POINTS[: len(sizes)]
    config = technique_config(S2DNASConfig, groups=8, split_points=points)
    module = S2DNASModule(config, BackboneConfig(name=name, kwargs=kwargs), DIGITS)
    layout, net = module.layout, module.model
    assert layout.group_sizes == tuple(tuple(MAPS[n] for n in group) for group in sizes)
    for norm in layout.norms:
        fractions = [hi / norm.channels for _, hi in net.plan.norms[norm.name][:-1]]
        assert fractions == [p / 8 for p in points[norm.group]], norm.name
    with torch.no_grad():
        logits = net.eval().forward_exits(torch.randn(2, *SIZE))
    assert [tuple(z.shape) for z in logits] == [(2, 10)] * 3


class _ImageNet(nn.Module):
    """A tiny CNN whose first conv reads a pooled image, optionally with the image added back."""

    def __init__(self, add_image: bool) -> None:
        super().__init__()
        self.pool, self.add_image = nn.AvgPool2d(2), add_image
        self.conv = nn.Conv2d(3, 3 if add_image else 16, 3, padding=1)
        self.head = nn.Conv2d(3, 16, 1) if add_image else nn.Identity()
        self.fc = nn.Linear(16, 10)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        return self.head(x + self.conv(x)) if self.add_image else self.conv(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Identity()


def test_a_conv_reading_the_image_through_a_pool_reads_it_whole_and_sums_with_it_are_refused():
    layout = analyse_backbone(_ImageNet(add_image=False), SIZE, "pooled")
    assert layout.convs[0].reads_image and layout.group_sizes == ((MAPS[16],),)
    net = transform(num_stages=2, groups=4, net=_ImageNet(add_image=False))  # check passes
    assert net.plan.convs["conv"].in_bounds is None
    with pytest.raises(UnsupportedBackboneError, match="adds the network input"):
        analyse_backbone(_ImageNet(add_image=True), SIZE, "summed")


@pytest.mark.parametrize(
    ("name", "kwargs", "offender"),
    [
        ("seresnet18", {}, "layer1.0.se.gate"),
        ("vit_tiny_patch16_224", {"img_size": 32}, "LayerNorm"),
    ],
)
def test_unsupported_backbones_fail_at_build_naming_module_and_alternatives(
    name: str, kwargs: dict, offender: str
) -> None:
    with pytest.raises(UnsupportedBackboneError, match=name) as err:
        transform(name, net=create_backbone(name, num_classes=10, **kwargs))
    assert offender in str(err.value) and "cifar_resnet20" in str(err.value)


class _GroupedNet(nn.Module):
    """A tiny CNN with a grouped (not depthwise) conv."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=2)
        )
        self.fc = nn.Linear(16, 10)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def get_classifier(self) -> nn.Module:
        return self.fc


def test_grouped_conv_is_rejected() -> None:
    with pytest.raises(UnsupportedBackboneError, match=r"'features.1'.*groups=2"):
        analyse_backbone(_GroupedNet(), SIZE, "grouped")


def test_too_many_groups_for_a_layer_is_a_clear_error() -> None:
    with pytest.raises(SettingsError, match="16 channels, fewer than groups=32"):
        transform(groups=32)


@pytest.mark.parametrize(
    ("split_points", "message"),
    [
        ([[2]], "has 1 points; 3 stages need 2"),
        ([[0, 4]], "in 1..7"),
        ([[5, 3]], "strictly increasing"),
        ([[1, 2], [3, 4]], "3 layer groups"),
    ],
)
def test_bad_split_points_are_rejected_before_building(
    split_points: list[list[int]], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        resolve_settings(split_points, None, num_stages=3, num_layer_groups=3, groups=8)


def _stage_input_before_last_conv(net: S2DNet, x: torch.Tensor, stage: int) -> torch.Tensor:
    """Stage `stage`'s own input (0-based) to the network's last conv."""
    last = net.backbone.get_submodule(net.layout.convs[-1].name)
    seen: list[torch.Tensor] = []
    handle = last.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    run = StageRun(x)
    for _ in range(stage + 1):
        net._advance(run)
    handle.remove()
    return seen[stage]


def test_indicator_matrix_reads_exactly_the_marked_earlier_stages() -> None:
    """m31 = 1, m32 = 0, m21 = 0 in every layer group: stage 3 reads stage 1's features but not
    stage 2's, so perturbing stage 2 leaves stage 3 unchanged and perturbing stage 1 does not;
    every non-final conv's stage-3 block is as wide as stage 1's and stage 3's slices."""
    torch.manual_seed(0)
    net = transform(concat=[[[False], [True, False]]]).eval()
    assert net.settings.reads(0, 2) == (0,) and net.settings.reads(0, 1) == ()
    final = net.layout.convs[-1].name
    for name, plan in net.plan.convs.items():
        conv = net.backbone.get_submodule(name)
        if plan.in_bounds is None or plan.depthwise:
            continue
        (a0, a1), _, (c0, c1) = plan.in_bounds
        expected = plan.in_bounds[2][1] if name == final else (a1 - a0) + (c1 - c0)
        assert conv.weights[2].shape[1] == expected, name
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        before = _stage_input_before_last_conv(net, x, 2)
        for stage, changes in ((1, False), (0, True)):
            perturbed = copy.deepcopy(net)
            for module in perturbed.modules():
                if isinstance(module, StagedConv2d):
                    module.weights[stage].add_(torch.randn_like(module.weights[stage]))
            after = _stage_input_before_last_conv(perturbed, x, 2)
            assert (not torch.equal(before, after)) is changes, stage


@pytest.mark.parametrize(
    ("name", "concat"),
    [
        (
            "cifar_resnet20",
            [[[True], [False, True]], [[False], [True, True]], [[True], [True, False]]],
        ),
        ("cifar_mobilenetv2", [[[False], [True, False]]]),
        ("cifar_vgg16_bn", [[[True], [False, True]]]),
    ],
)
def test_any_indicator_matrix_keeps_the_transformation_exact(name: str, concat: list) -> None:
    """S2DNet's build-time check (stages == the masked original network) passes for matrices
    that differ per layer group, and the exits stay correctly shaped."""
    net = transform(name=name, concat=concat).eval()
    assert all(len(m) == 2 for m in net.settings.concat)
    logits = net.forward_exits(torch.randn(2, *SIZE))
    assert [t.shape for t in logits] == [(2, 10)] * 3


def test_the_earlier_per_stage_bits_are_the_matrix_with_equal_rows() -> None:
    old = resolve_settings([[2, 5]], [[True], [False]], 3, 3, 8)
    new = resolve_settings([[2, 5]], [[[True], [False, False]]], 3, 3, 8)
    assert old == new
    record = {"split_points": [[2, 5]] * 3, "concat": [[True, True, False], [False, True, True]]}
    settings = S2DSettings.from_dict(record)  # a record written before the matrix
    assert settings.reads(0, 1) == (0,) and settings.reads(2, 1) == ()
    assert settings.reads(0, 2) == () and settings.reads(1, 2) == (0, 1)
    assert S2DSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(SettingsError, match="row of stage 3 has 1 bits; it needs 2"):
        resolve_settings(None, [[[True], [True]]], 3, 3, 8)
    with pytest.raises(SettingsError, match="indicator-matrix form"):
        resolve_settings(None, [[True]], 3, 3, 8)  # per-stage bits, one row short
