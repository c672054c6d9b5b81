"""LGC / SFR masked layers: importance dropping, schedule limits, state, and exact conversion."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from dynlab.evaluation.macs import count_macs
from dynlab.nn import (
    ACTIVATIONS,
    CondensedLGC,
    CondensedSFR,
    LearnedGroupConv,
    SparseFeatureReactivation,
)

# (in, out, groups, factor): groups == factor, groups < factor, groups > factor, odd sizes
LGC_SHAPES = [(16, 8, 4, 4), (24, 12, 2, 4), (24, 8, 4, 2), (48, 6, 3, 8), (12, 6, 3, 6)]
# (k, C_in, groups, sparse factor)
SFR_SHAPES = [(8, 16, 4, 4), (8, 24, 2, 4), (12, 24, 4, 8), (6, 18, 3, 6), (4, 12, 4, 2)]


def _randomize(layer: nn.Module, seed: int) -> None:
    """Random conv weights and BN affine/running stats, so eval-mode BN is far from identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.conv.weight.copy_(torch.randn(layer.conv.weight.shape, generator=gen))
        c = layer.norm.num_features
        layer.norm.weight.copy_(torch.randn(c, generator=gen))
        layer.norm.bias.copy_(torch.randn(c, generator=gen))
        layer.norm.running_mean.copy_(torch.randn(c, generator=gen))
        layer.norm.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def _sparsify(layer: nn.Module, seed: int) -> None:
    """Run every drop of the schedule, perturbing the weights between drops like training would."""
    gen = torch.Generator().manual_seed(seed + 1000)
    for _ in range(layer.stages):
        layer.drop()
        with torch.no_grad():
            layer.conv.weight.add_(0.3 * torch.randn(layer.conv.weight.shape, generator=gen))


def _group_keep_lgc(layer: LearnedGroupConv) -> list[set[int]]:
    """Inputs each output group reads, from the mask, checking all members of a group agree."""
    mask = layer.mask
    keeps = []
    for g in range(layer.groups):
        rows = mask[g :: layer.groups]
        assert (rows == rows[0]).all()
        keeps.append(set(rows[0].nonzero().flatten().tolist()))
    return keeps


def _group_keep_sfr(layer: SparseFeatureReactivation) -> list[set[int]]:
    """Outputs each input group writes, from the mask, checking all members of a group agree."""
    mask = layer.mask
    keeps = []
    for g in range(layer.groups):
        cols = mask[:, g :: layer.groups]
        assert (cols == cols[:, :1]).all()
        keeps.append(set(cols[:, 0].nonzero().flatten().tolist()))
    return keeps


def test_activations_are_relu_and_official_hard_swish() -> None:
    x = torch.linspace(-5, 5, 101)
    assert torch.equal(ACTIVATIONS["relu"]()(x), x.clamp(min=0))
    official_hs = x * torch.nn.functional.relu6(x + 3) / 6
    torch.testing.assert_close(ACTIVATIONS["hswish"]()(x), official_hs)


@pytest.mark.parametrize("activation", ["relu", "hswish"])
@pytest.mark.parametrize("shape", LGC_SHAPES)
def test_condensed_lgc_matches_masked_layer(
    shape: tuple[int, int, int, int], activation: str
) -> None:
    i, o, g, c = shape
    layer = LearnedGroupConv(i, o, g, c, activation)
    _randomize(layer, seed=i * o + g + c)
    _sparsify(layer, seed=i)
    condensed = layer.condensed()
    assert isinstance(condensed, CondensedLGC)
    x = torch.randn(3, i, 5, 4)
    expected = layer.eval()(x)
    torch.testing.assert_close(condensed.eval()(x), expected, atol=1e-5, rtol=1e-5)
    # G * in / C selected inputs: (24, 8, 4, 2) selects 48 of 24, so some are duplicated with BN stats
    assert condensed.index.numel() == g * (i // c)


@pytest.mark.parametrize("activation", ["relu", "hswish"])
@pytest.mark.parametrize("shape", SFR_SHAPES)
def test_condensed_sfr_matches_masked_layer(
    shape: tuple[int, int, int, int], activation: str
) -> None:
    k, o, g, s = shape
    layer = SparseFeatureReactivation(k, o, g, s, activation)
    _randomize(layer, seed=k * o + g + s)
    _sparsify(layer, seed=k)
    condensed = layer.condensed()
    assert isinstance(condensed, CondensedSFR)
    x = torch.randn(3, k, 4, 5)
    expected = layer.eval()(x)
    got = condensed.eval()(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # outputs written by no group get exactly zero reactivation
    written = set().union(*_group_keep_sfr(layer))
    unwritten = sorted(set(range(o)) - written)
    if unwritten:
        assert torch.equal(got[:, unwritten], torch.zeros_like(got[:, unwritten]))


def test_sfr_output_kept_by_no_group_is_zero() -> None:
    # G=2, S=4, 8 outputs: each group keeps 2 of 8, so at least 4 outputs are written by nobody
    layer = SparseFeatureReactivation(4, 8, 2, 4)
    _randomize(layer, seed=3)
    _sparsify(layer, seed=3)
    unwritten = sorted(set(range(8)) - set().union(*_group_keep_sfr(layer)))
    assert len(unwritten) >= 4
    x = torch.randn(2, 4, 3, 3)
    out = layer.condensed().eval()(x)
    assert torch.equal(out[:, unwritten], torch.zeros_like(out[:, unwritten]))
    torch.testing.assert_close(out, layer.eval()(x), atol=1e-5, rtol=1e-5)


def test_lgc_drops_the_weakest_live_inputs_per_group() -> None:
    # 8 inputs, outputs {0, 2} = group 0, {1, 3} = group 1, C=4: 2 inputs dropped per stage
    layer = LearnedGroupConv(8, 4, groups=2, condense_factor=4)
    ramp = torch.arange(1.0, 9.0)
    w = torch.empty(4, 8)
    w[0], w[2] = -ramp.flip(0), 0.5 * ramp.flip(0)  # group 0: sum of |.| weakest are 7, 6, ...
    w[1], w[3] = ramp, -ramp  # group 1: weakest are 0, 1, ...
    with torch.no_grad():
        layer.conv.weight.copy_(w[:, :, None, None])
    layer.drop()
    assert _group_keep_lgc(layer) == [set(range(6)), set(range(2, 8))]
    # a live input whose weights become exactly 0 ties with the dropped ones (and sorts before
    # them by index): it must go next, with the weakest other live input; the official
    # "positions [count, count + delta] of the sort" rule would re-drop dead input 7 instead
    with torch.no_grad():
        layer.conv.weight[0::2, 0] = 0
    layer.drop()
    assert _group_keep_lgc(layer) == [{1, 2, 3, 4}, set(range(4, 8))]
    assert int(layer.drop_count) == 4 and int(layer.drop_stage) == 2
    layer.drop()
    assert _group_keep_lgc(layer) == [{1, 2}, {6, 7}]


def test_sfr_drops_the_weakest_live_outputs_per_input_group() -> None:
    # 4 inputs: group 0 = {0, 2}, group 1 = {1, 3}; 8 outputs, S=4: 2 outputs dropped per stage
    layer = SparseFeatureReactivation(4, 8, groups=2, sparse_factor=4)
    ramp = torch.arange(1.0, 9.0)  # output o
    w = torch.empty(8, 4)
    w[:, 0], w[:, 2] = ramp, -ramp  # group 0: weakest outputs 0, 1, ...
    w[:, 1], w[:, 3] = -ramp.flip(0), 2 * ramp.flip(0)  # group 1: weakest outputs 7, 6, ...
    with torch.no_grad():
        layer.conv.weight.copy_(w[:, :, None, None])
    layer.drop()
    assert _group_keep_sfr(layer) == [set(range(2, 8)), set(range(6))]
    layer.drop()
    layer.drop()
    assert _group_keep_sfr(layer) == [{6, 7}, {0, 1}]


@pytest.mark.parametrize("shape", LGC_SHAPES)
def test_lgc_each_group_keeps_in_over_c_inputs(shape: tuple[int, int, int, int]) -> None:
    i, o, g, c = shape
    layer = LearnedGroupConv(i, o, g, c)
    _randomize(layer, seed=1)
    densities = []
    for _ in range(layer.stages):
        layer.drop()
        densities.append(layer.density())
    assert [len(k) for k in _group_keep_lgc(layer)] == [i // c] * g
    assert densities == pytest.approx([1 - (s + 1) / c for s in range(c - 1)])
    assert set(layer.mask.unique().tolist()) <= {0.0, 1.0}
    assert layer.mask.dtype == torch.float32


@pytest.mark.parametrize("shape", SFR_SHAPES)
def test_sfr_each_group_keeps_out_over_s_outputs(shape: tuple[int, int, int, int]) -> None:
    k, o, g, s = shape
    layer = SparseFeatureReactivation(k, o, g, s)
    _randomize(layer, seed=2)
    _sparsify(layer, seed=2)
    assert [len(keep) for keep in _group_keep_sfr(layer)] == [o // s] * g
    assert layer.density() == pytest.approx(1 / s)
    assert set(layer.mask.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("cls", [LearnedGroupConv, SparseFeatureReactivation])
def test_drop_beyond_schedule_raises(cls: type) -> None:
    layer = cls(8, 8, 2, 4)
    assert layer.stages == 3
    for _ in range(3):
        layer.drop()
    mask = layer.mask.clone()
    with pytest.raises(RuntimeError, match="all 3 drops"):
        layer.drop()
    assert torch.equal(layer.mask, mask) and int(layer.drop_stage) == 3


@pytest.mark.parametrize("cls", [LearnedGroupConv, SparseFeatureReactivation])
def test_condensed_before_completion_names_the_drop_counts(cls: type) -> None:
    layer = cls(16, 16, 4, 8)
    for _ in range(3):
        layer.drop()
    with pytest.raises(ValueError, match="sparsification incomplete: 3 of 7 drops"):
        layer.condensed()


def test_factor_one_has_no_drops_and_converts_directly() -> None:
    layer = LearnedGroupConv(6, 4, groups=2, condense_factor=1)
    _randomize(layer, seed=5)
    assert layer.stages == 0
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(layer.condensed().eval()(x), layer.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("cls", "args", "message"),
    [
        (LearnedGroupConv, (10, 8, 4, 2), "in_channels=10 is not divisible by groups=4"),
        (LearnedGroupConv, (8, 6, 4, 4), "out_channels=6 is not divisible by groups=4"),
        (LearnedGroupConv, (12, 6, 3, 8), "in_channels=12 is not divisible by condense_factor=8"),
        (SparseFeatureReactivation, (6, 12, 4, 4), "in_channels=6 is not divisible by groups=4"),
        (
            SparseFeatureReactivation,
            (8, 12, 4, 8),
            "out_channels=12 is not divisible by sparse_factor=8",
        ),
        (SparseFeatureReactivation, (8, 10, 4, 2), "out_channels=10 is not divisible by groups=4"),
        (LearnedGroupConv, (8, 8, 0, 2), "groups must be a positive int"),
    ],
)
def test_invalid_shapes_raise_value_error(cls: type, args: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(*args)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        cls(8, 8, 2, 2, "gelu")


def test_lgc_condensed_macs_and_params_are_one_over_c() -> None:
    i, o, g, c, hw = 32, 16, 4, 8, 6
    layer = LearnedGroupConv(i, o, g, c)
    _randomize(layer, seed=7)
    _sparsify(layer, seed=7)
    condensed = layer.condensed()
    dense_macs = count_macs(layer, (i, hw, hw))
    assert dense_macs == i * o * hw * hw
    assert count_macs(condensed, (i, hw, hw)) == dense_macs // c
    conv_params = sum(p.numel() for p in condensed.conv.parameters())
    assert conv_params == i * o // c
    assert sum(p.numel() for p in condensed.parameters()) < sum(
        p.numel() for p in layer.parameters()
    )


def test_sfr_condensed_macs_and_params_are_one_over_s() -> None:
    k, o, g, s, hw = 8, 32, 4, 8, 5
    layer = SparseFeatureReactivation(k, o, g, s)
    _randomize(layer, seed=8)
    _sparsify(layer, seed=8)
    condensed = layer.condensed()
    dense_macs = count_macs(layer, (k, hw, hw))
    assert dense_macs == k * o * hw * hw
    assert count_macs(condensed, (k, hw, hw)) == dense_macs // s
    assert sum(p.numel() for p in condensed.conv.parameters()) == k * o // s
    # the scatter index is one int per kept (group, output) pair, not an O x O float matrix
    assert condensed.index.dtype == torch.long and condensed.index.shape == (g * o // s,)


@pytest.mark.parametrize("cls", [LearnedGroupConv, SparseFeatureReactivation])
def test_state_dict_round_trip_keeps_mask_and_counters(cls: type) -> None:
    layer = cls(16, 16, 4, 8)
    _randomize(layer, seed=9)
    layer.drop()
    layer.drop()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = cls(16, 16, 4, 8)
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh.mask, layer.mask) and fresh.mask.dtype == torch.float32
    assert int(fresh.drop_stage) == 2 and int(fresh.drop_count) == 4
    assert fresh.density() == pytest.approx(1 - 2 / 8)
    # the schedule continues identically from the restored state
    layer.drop()
    fresh.drop()
    assert torch.equal(fresh.mask, layer.mask)


@pytest.mark.parametrize(
    ("masked", "condensed_cls"),
    [(LearnedGroupConv, CondensedLGC), (SparseFeatureReactivation, CondensedSFR)],
)
def test_condensed_state_dict_loads_into_an_empty_deploy_module(
    masked: type, condensed_cls: type
) -> None:
    layer = masked(8, 16, 4, 2, "hswish")
    _randomize(layer, seed=10)
    _sparsify(layer, seed=10)
    condensed = layer.condensed().eval()
    empty = condensed_cls(8, 16, 4, 2, "hswish").eval()
    empty.load_state_dict(condensed.state_dict())
    x = torch.randn(2, 8, 3, 3)
    assert torch.equal(empty(x), condensed(x))


def test_group_lasso_matches_official_formula_and_stops_after_schedule() -> None:
    layer = LearnedGroupConv(8, 4, groups=2, condense_factor=2)
    _randomize(layer, seed=11)
    w = layer.conv.weight.detach().flatten(1)
    # group g = outputs {g, g+2}: sum over inputs of the L2 norm of the group's column
    expected = sum(
        w[g::2, j].pow(2).sum().clamp(min=1e-6).sqrt() for g in range(2) for j in range(8)
    )
    torch.testing.assert_close(layer.group_lasso(), expected)
    layer.group_lasso().backward()
    assert layer.conv.weight.grad is not None
    layer.drop()
    assert float(layer.group_lasso()) == 0.0

    sfr = SparseFeatureReactivation(4, 6, groups=2, sparse_factor=3)
    _randomize(sfr, seed=12)
    w = sfr.conv.weight.detach().flatten(1)
    # group g = inputs {g, g+2}: sum over outputs of the L2 norm of the group's row
    expected = sum(
        w[o, g::2].pow(2).sum().clamp(min=1e-6).sqrt() for g in range(2) for o in range(6)
    )
    torch.testing.assert_close(sfr.group_lasso(), expected)


def test_masked_weights_get_no_gradient() -> None:
    layer = LearnedGroupConv(8, 4, groups=2, condense_factor=4)
    _randomize(layer, seed=13)
    layer.drop()
    layer.train()(torch.randn(2, 8, 3, 3)).square().sum().backward()
    grad = layer.conv.weight.grad.flatten(1)
    assert torch.equal(grad[layer.mask == 0], torch.zeros_like(grad[layer.mask == 0]))
    assert (grad[layer.mask == 1] != 0).any()
