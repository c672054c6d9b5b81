"""The S2D transformation: stage slices, equivalence with the original, MACs, early exit, rejections."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dynlab.backbones import create_backbone
from dynlab.evaluation.macs import count_macs
from dynlab.techniques.s2dnas.analysis import UnsupportedBackboneError, analyse_backbone
from dynlab.techniques.s2dnas.layers import StagedBatchNorm2d, StagedConv2d, StageRun
from dynlab.techniques.s2dnas.model import S2DNet
from dynlab.techniques.s2dnas.settings import SettingsError, resolve_settings
from dynlab.techniques.s2dnas.transform import stage_bounds

SIZE = (3, 32, 32)


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


def test_mobilenetv2_depthwise_convs_tie_all_map_sizes_into_one_layer_group() -> None:
    layout = analyse_backbone(
        create_backbone("cifar_mobilenetv2", num_classes=10), SIZE, "cifar_mobilenetv2"
    )
    assert layout.num_layer_groups == 1
    assert any(conv.depthwise for conv in layout.convs)


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
