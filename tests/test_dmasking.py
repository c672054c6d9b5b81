"""dynlab.nn.dmasking: Gumbel weights, channel masks, the one-pass kernel mix, and the resolution
search's subsampling, interspersed placement and occupancy-normalised pooling (FBNetV2 Sec. 3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynlab.nn.dmasking import (
    ChannelMask,
    expected_width,
    gumbel_weights,
    intersperse,
    kernel_masks,
    mix_kernel,
    mix_placed,
    one_hot,
    receptive_positions,
    spread_positions,
    subsample_nearest,
)


def test_gumbel_weights_sum_to_one_follow_tau_and_are_reproducible() -> None:
    logits = torch.tensor([0.3, -0.2, 0.1, 0.0])
    gen = torch.Generator().manual_seed(0)
    cold = torch.stack([gumbel_weights(logits, 0.001, generator=gen) for _ in range(200)])
    hot = torch.stack([gumbel_weights(logits, 100.0, generator=gen) for _ in range(200)])
    for w in (cold, hot):
        assert torch.allclose(w.sum(-1), torch.ones(200), atol=1e-6) and (w >= 0).all()
    assert (cold.max(-1).values > 0.99).float().mean() > 0.95  # low tau: nearly one-hot
    assert (hot.max(-1).values < 0.3).all()  # high tau: nearly uniform
    assert len(set(cold.argmax(-1).tolist())) > 1  # still a sample, not the argmax
    a = gumbel_weights(logits, 1.0, generator=torch.Generator().manual_seed(3))
    b = gumbel_weights(logits, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # a logit far above the others wins almost always
    biased = torch.tensor([8.0, 0.0, 0.0, 0.0])
    wins = sum(int(gumbel_weights(biased, 1.0, generator=gen).argmax()) == 0 for _ in range(100))
    assert wins >= 95
    with pytest.raises(ValueError, match="temperature"):
        gumbel_weights(logits, 0.0)


def test_hard_gumbel_is_one_hot_forward_with_soft_gradients() -> None:
    logits = torch.zeros(3, requires_grad=True)
    w = gumbel_weights(logits, 1.0, hard=True, generator=torch.Generator().manual_seed(1))
    assert sorted(w.detach().tolist()) == pytest.approx([0.0, 0.0, 1.0])
    (w * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert torch.equal(one_hot(1, 3, logits), torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError):
        one_hot(3, 3, logits)


def test_channel_mask_is_the_weighted_sum_of_prefix_masks() -> None:
    mask = ChannelMask([2, 4, 3])
    g = torch.tensor([0.5, 0.2, 0.3])
    # channel j keeps the weight of the options wider than j
    assert torch.allclose(mask.mask(g), torch.tensor([1.0, 1.0, 0.5, 0.2]))
    assert expected_width(g, [2, 4, 3]).item() == pytest.approx(0.5 * 2 + 0.2 * 4 + 0.3 * 3)
    assert mask.expected(g).item() == pytest.approx(2.7)
    x = torch.randn(2, 4, 3, 3)
    out = mask(x, torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(out[:, :3], x[:, :3]) and (out[:, 3] == 0).all()
    # a masked conv output equals the narrow conv's output, zero-padded (paper eq. 2)
    conv = nn.Conv2d(5, 4, 3, padding=1)
    narrow = F.conv2d(x.new_ones(2, 5, 3, 3), conv.weight[:2], conv.bias[:2], padding=1)
    wide = mask(conv(x.new_ones(2, 5, 3, 3)), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(wide[:, :2], narrow) and (wide[:, 2:] == 0).all()
    with pytest.raises(ValueError):
        ChannelMask([0, 2])
    with pytest.raises(ValueError):
        mask.mask(torch.ones(2))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [7, 8])
def test_kernel_mix_runs_every_kernel_option_in_one_conv(stride: int, size: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, size, size)
    weight = torch.randn(4, 1, 5, 5)
    masks = kernel_masks([3, 5], 5)
    k3 = F.conv2d(x, mix_kernel(weight, torch.tensor([1.0, 0.0]), masks), None, stride, 2, 1, 4)
    ref3 = F.conv2d(x, weight[:, :, 1:4, 1:4], None, stride, 1, 1, 4)
    assert torch.allclose(k3, ref3, atol=1e-5)
    k5 = F.conv2d(x, mix_kernel(weight, torch.tensor([0.0, 1.0]), masks), None, stride, 2, 1, 4)
    assert torch.allclose(k5, F.conv2d(x, weight, None, stride, 2, 1, 4), atol=1e-5)
    g = torch.tensor([0.25, 0.75])
    mixed = F.conv2d(x, mix_kernel(weight, g, masks), None, stride, 2, 1, 4)
    assert torch.allclose(mixed, 0.25 * k3 + 0.75 * k5, atol=1e-5)  # linear in g
    with pytest.raises(ValueError):
        kernel_masks([4], 5)


def test_subsample_nearest_is_centre_aligned_and_identity_at_full_size() -> None:
    x = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 8, 8)
    half = subsample_nearest(x, (4, 4))
    assert half[0, 0, 0].tolist() == [1.0, 3.0, 5.0, 7.0]  # pixel i <- floor((i + 1/2) * 2)
    assert subsample_nearest(x, (8, 8)) is x


def test_receptive_positions_every_other_row_for_2x_and_nearest_otherwise() -> None:
    assert receptive_positions(4, 16, 32, 4) == [0, 2, 4, 6]
    # FBNetV2-F grid: 224 -> 7x7 at stride 32; 128 -> 4x4 lands at 0, 2, 4, 5
    assert receptive_positions(4, 128, 224, 32) == [0, 2, 4, 5]
    assert receptive_positions(6, 192, 224, 32) == [0, 1, 2, 4, 5, 6]
    assert receptive_positions(7, 224, 224, 32) == list(range(7))
    assert spread_positions(3, 6) == [0, 2, 4]


@pytest.mark.parametrize("small", [4, 5, 6, 7])
def test_each_placed_pixel_holds_the_image_pixel_at_its_position(small: int) -> None:
    """Subsample, identity body (stride 1), place back: every placed value is the full image's
    value at that position, for integer and fractional ratios alike (pixel alignment)."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 8, 8)
    pos = receptive_positions(small, small, 8, 1)
    placed = intersperse(subsample_nearest(x, (small, small)), (8, 8), pos, pos)
    grid = torch.zeros(8, 8, dtype=torch.bool)
    grid[torch.tensor(pos).view(-1, 1), torch.tensor(pos).view(1, -1)] = True
    assert torch.equal(placed[..., grid], x[..., grid])
    assert (placed[..., ~grid] == 0).all()


def test_intersperse_places_values_and_rejects_bad_positions() -> None:
    y = torch.arange(4.0).view(1, 1, 2, 2)
    out = intersperse(y, (4, 4))  # default: every other row and column
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 0, 0], expected[0, 0, 0, 2], expected[0, 0, 2, 0], expected[0, 0, 2, 2] = (
        0.0,
        1.0,
        2.0,
        3.0,
    )
    assert torch.equal(out, expected)
    assert intersperse(y, (2, 2)) is y
    with pytest.raises(ValueError, match="increasing"):
        intersperse(y, (4, 4), [1, 1], [0, 2])
    with pytest.raises(ValueError, match="fit"):
        intersperse(y, (4, 4), [0, 4], [0, 2])
    with pytest.raises(ValueError, match="positions for a map"):
        intersperse(y, (4, 4), [0], [0, 2])


def test_pointwise_body_commutes_with_placement_and_pooling() -> None:
    """A bias-free 1x1 conv maps zeros to zeros: placing then convolving == convolving then
    placing, and the occupancy-normalised pool of the placed map == the small map's pool."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 1, bias=False)
    y = torch.randn(2, 3, 3, 3)
    pos = receptive_positions(3, 6, 8, 2)
    with torch.no_grad():
        assert torch.allclose(
            conv(intersperse(y, (4, 4), pos, pos)), intersperse(conv(y), (4, 4), pos, pos)
        )
        pooled = mix_placed([conv(y)], [torch.tensor(1.0)], (4, 4), [(pos, pos)]).mean((2, 3))
        assert torch.allclose(pooled, conv(y).mean((2, 3)), atol=1e-6)


def test_mix_placed_is_occupancy_normalised_and_exact_at_one_hot() -> None:
    torch.manual_seed(0)
    big, small = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)
    pos_big, pos_small = (list(range(4)),) * 2, ([0, 2], [0, 2])
    for g, ref in (((1.0, 0.0), big), ((0.0, 1.0), small)):
        w = [torch.tensor(v) for v in g]
        out = mix_placed([big, small], w, (4, 4), [pos_big, pos_small]).mean((2, 3))
        assert torch.allclose(out, ref.mean((2, 3)), atol=1e-6)
    w = torch.tensor([0.3, 0.7], requires_grad=True)
    out = mix_placed([big, small], [w[0], w[1]], (4, 4), [pos_big, pos_small])
    placed = 0.3 * big + 0.7 * intersperse(small, (4, 4), *pos_small)
    occupancy = 0.3 * 16 + 0.7 * 4
    assert torch.allclose(out.mean((2, 3)), placed.sum((2, 3)) / occupancy, atol=1e-6)
    out.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        mix_placed([big], [], (4, 4), [pos_big])
