"""Real early exit: same answers as the offline rule, and exited samples are really dropped."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dynlab.evaluation.budgeted import calibrate_thresholds, exit_distribution, exit_indices
from dynlab.evaluation.early_exit import early_exit_predict


class ChainNet(nn.Module):
    """Conv blocks with a classifier head after each; its session runs later blocks on fewer."""

    def __init__(self, num_blocks: int = 3, width: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(3 if i == 0 else width, width, 3, padding=1), nn.ReLU())
            for i in range(num_blocks)
        )
        self.heads = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
            for _ in range(num_blocks)
        )
        self.block_batch_sizes: list[int] = []  # how many samples each block call computed on

    def run_block(self, k: int, h: Tensor) -> Tensor:
        self.block_batch_sizes.append(len(h))
        return self.blocks[k](h)

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        logits = []
        for k, head in enumerate(self.heads):
            x = self.run_block(k, x)
            logits.append(head(x))
        return logits

    def exit_session(self, x: Tensor) -> ChainSession:
        return ChainSession(self, x)


class ChainSession:
    def __init__(self, net: ChainNet, x: Tensor) -> None:
        self.net, self.h, self.k = net, x, 0
        self.num_exits = len(net.blocks)

    def next_exit(self) -> Tensor:
        self.h = self.net.run_block(self.k, self.h)
        self.k += 1
        return self.net.heads[self.k - 1](self.h)

    def keep(self, mask: Tensor) -> None:
        self.h = self.h[mask]


@pytest.fixture
def net() -> ChainNet:
    torch.manual_seed(0)
    return ChainNet().eval()


def inputs(n: int, seed: int) -> Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def offline(net: ChainNet, x: Tensor, thresholds: Tensor) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        logits = torch.stack(net.forward_exits(x))
    exits = exit_indices(logits.softmax(-1), thresholds)
    return logits[exits, torch.arange(len(x))], exits


@pytest.mark.parametrize("q", [0.3, 1.0, 3.0])
def test_matches_the_offline_rule_and_drops_exited_samples(net: ChainNet, q: float) -> None:
    with torch.no_grad():
        val_probs = torch.stack(net.forward_exits(inputs(64, seed=1))).softmax(-1)
    thresholds = calibrate_thresholds(val_probs, exit_distribution(q, 3))
    x = inputs(40, seed=2)
    expected_logits, expected_exits = offline(net, x, thresholds)

    net.block_batch_sizes.clear()
    logits, exits = early_exit_predict(net, x, thresholds)
    assert torch.equal(exits, expected_exits)
    assert torch.allclose(logits, expected_logits, atol=1e-5)
    assert 0 < (exits == 0).sum() < 40  # the budget really splits the batch
    still_in = [int((exits >= k).sum()) for k in range(3)]
    assert net.block_batch_sizes == [n for n in still_in if n > 0]


def test_everybody_leaving_at_the_first_exit_skips_later_blocks(net: ChainNet) -> None:
    logits, exits = early_exit_predict(net, inputs(10, seed=3), [0.0, 0.0, 0.0])
    assert exits.tolist() == [0] * 10
    assert net.block_batch_sizes == [10]
    assert logits.shape == (10, 5)


def test_nobody_leaving_early_uses_the_last_exit(net: ChainNet) -> None:
    x = inputs(10, seed=3)
    logits, exits = early_exit_predict(net, x, [float("inf"), float("inf"), 0.0])
    assert exits.tolist() == [2] * 10
    with torch.no_grad():
        assert torch.allclose(logits, net.forward_exits(x)[-1], atol=1e-6)


def test_refuses_training_mode_and_a_wrong_threshold_count(net: ChainNet) -> None:
    with pytest.raises(ValueError, match="eval mode"):
        early_exit_predict(net.train(), inputs(4, seed=0), [0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="thresholds must have shape"):
        early_exit_predict(net.eval(), inputs(4, seed=0), [0.5, 0.0])
