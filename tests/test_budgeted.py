"""Budgeted-batch rule (MSDNet): hand-computed cases, the loop reference, and DDP gathering."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from dynlab.evaluation.budgeted import (
    DEFAULT_QS,
    budgeted_curve,
    calibrate_thresholds,
    exit_distribution,
    exit_indices,
)
from dynlab.evaluation.outputs import collect_exit_probs
from dynlab.evaluation.reference import budgeted_curve_loop


def probs_with(conf: list[list[float]], pred: list[list[int]], num_classes: int = 3) -> Tensor:
    """Softmax-like outputs [K,N,C] whose max probability is conf[k][i], on class pred[k][i]."""
    conf_t = torch.tensor(conf)
    rest = ((1 - conf_t) / (num_classes - 1)).unsqueeze(-1).expand(*conf_t.shape, num_classes)
    probs = rest.clone()
    probs.scatter_(-1, torch.tensor(pred).unsqueeze(-1), conf_t.unsqueeze(-1))
    return probs


def test_exit_distribution_is_q_to_the_k_normalised() -> None:
    assert torch.allclose(exit_distribution(0.5, 3), torch.tensor([4.0, 2.0, 1.0]).double() / 7)
    assert torch.allclose(exit_distribution(1.0, 4), torch.full((4,), 0.25).double())
    with pytest.raises(ValueError, match="q must be > 0"):
        exit_distribution(0.0, 3)


def test_default_levels_are_msdnets_39() -> None:
    assert len(DEFAULT_QS) == 39
    assert DEFAULT_QS[0] == pytest.approx(0.05) and DEFAULT_QS[-1] == pytest.approx(1.95)


def test_ties_with_the_threshold_exit_together_and_quotas_count_all_samples() -> None:
    val = probs_with(
        [
            [
                0.9,
                0.8,
                0.8,
                0.6,
                0.55,
            ],  # quota 2: threshold 0.8, and the tied 3rd sample leaves too
            [0.99, 0.7, 0.95, 0.9, 0.65],  # quota 2 of all 5: skip 0, 2 (gone); reach 3, then 4
            [0.5, 0.5, 0.5, 0.5, 0.5],
        ],
        [[0] * 5] * 3,
    )
    thresholds = calibrate_thresholds(val, torch.tensor([0.4, 0.4, 0.2]))
    assert thresholds.tolist() == [pytest.approx(0.8), pytest.approx(0.65), -math.inf]
    assert exit_indices(val, thresholds).tolist() == [0, 0, 0, 1, 1]


def test_an_exit_whose_quota_exceeds_what_remains_takes_nobody() -> None:
    val = probs_with([[0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6], [0.5] * 4], [[0] * 4] * 3)
    # exit 1 takes 2 of 4; exit 2 wants floor(4 * 0.75) = 3 but only 2 remain.
    thresholds = calibrate_thresholds(val, torch.tensor([0.5, 0.75, 0.0]))
    assert thresholds[1] == math.inf
    assert exit_indices(val, thresholds).tolist() == [0, 0, 2, 2]


class TestTwoExitBudgets:
    """Two exits, 4 val samples; test confidences at exit 1: 0.95, 0.75, 0.7; targets 0, 1, 2."""

    val = probs_with([[0.9, 0.8, 0.7, 0.6], [0.9] * 4], [[0] * 4, [0] * 4])
    test = probs_with([[0.95, 0.75, 0.7], [0.9] * 3], [[0, 1, 0], [0, 1, 2]])
    targets = torch.tensor([0, 1, 2])
    val_targets = torch.zeros(4, dtype=torch.long)

    def curve(self, q: float) -> dict:
        (record,) = budgeted_curve(
            self.val, self.val_targets, self.test, self.targets, [10.0, 30.0], qs=[q]
        )
        return record

    def test_small_q_sends_everybody_out_at_the_first_exit(self) -> None:
        record = self.curve(0.01)  # quota floor(4 / 1.01) = 3: threshold 0.7, met by all of test
        assert record["thresholds"] == [pytest.approx(0.7), -math.inf]
        assert record["exit_fractions"] == [1.0, 0.0]
        assert record["avg_macs"] == 10.0
        assert record["accuracy"] == pytest.approx(200 / 3)  # exit 1 misses sample 2
        assert record["val_accuracy"] == 100.0

    def test_large_q_lets_nobody_out_early(self) -> None:
        record = self.curve(100.0)  # quota floor(4 / 101) = 0
        assert record["thresholds"] == [math.inf, -math.inf]
        assert record["exit_fractions"] == [0.0, 1.0]
        assert record["avg_macs"] == 30.0
        assert record["accuracy"] == 100.0

    def test_a_budget_between_mixes_exits(self) -> None:
        record = self.curve(1.0)  # quota 2: threshold 0.8; only test sample 0 leaves early
        assert record["exit_fractions"] == [pytest.approx(1 / 3), pytest.approx(2 / 3)]
        assert record["avg_macs"] == pytest.approx((10 + 2 * 30) / 3)
        assert record["accuracy"] == 100.0  # exit 2 gets samples 1 and 2 right


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_curve_equals_the_per_sample_loop(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[Tensor, Tensor]:
        # Integer logits make many confidences tie exactly, the hard case for the rule.
        logits = torch.randint(0, 4, (4, n, 5), generator=generator).float()
        logits *= torch.arange(1, 5).view(4, 1, 1)
        return logits.softmax(-1), torch.randint(0, 5, (n,), generator=generator)

    val, test = split(203), split(151)
    exit_macs = [1.0, 2.5, 4.0, 7.0]
    vectorised = budgeted_curve(*val, *test, exit_macs)
    assert len(vectorised) == 39
    assert vectorised == budgeted_curve_loop(*val, *test, exit_macs)


def test_logits_and_mismatched_macs_are_rejected() -> None:
    probs = torch.rand(2, 6, 3).softmax(-1)
    y = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="softmax probabilities"):
        budgeted_curve(probs * 10, y, probs, y, [1.0, 2.0])
    with pytest.raises(ValueError, match="exit_macs"):
        budgeted_curve(probs, y, probs, y, [1.0])


class ScaledExits(nn.Module):
    """Two exits made of element-wise ops only, so outputs do not depend on how batches are cut."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, 3.0]))

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return [x[:, :4] * self.scale[0], x[:, :4] * self.scale[1] + x[:, 4:]]


def ddp_curve(rank: int = 0, world_size: int = 1) -> dict:
    """Val outputs and budgeted curve from this rank's contiguous shards of fixed val/test sets
    (37 and 23 samples: shards of unequal size), as dynlab.data's eval loaders shard them."""
    generator = torch.Generator().manual_seed(0)
    model = ScaledExits()

    def shard(n: int) -> DataLoader:
        data = TensorDataset(
            torch.randn(n, 8, generator=generator), torch.randint(0, 4, (n,), generator=generator)
        )
        own = range(rank * n // world_size, (rank + 1) * n // world_size)
        return DataLoader(Subset(data, own), batch_size=5)

    val = collect_exit_probs(model, shard(37))
    test = collect_exit_probs(model, shard(23))
    return {"val": val, "curve": budgeted_curve(*val, *test, [1.0, 2.0])}


def ddp_worker(rank: int, world_size: int, port: int, out: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.save(ddp_curve(rank, world_size), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned processes each import torch
def test_two_processes_give_the_single_process_curve(tmp_path: Path) -> None:
    mp.spawn(ddp_worker, args=(2, free_port(), tmp_path), nprocs=2)
    single = ddp_curve()
    for rank in range(2):
        gathered = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(gathered["val"][0], single["val"][0])
        assert torch.equal(gathered["val"][1], single["val"][1])
        assert gathered["curve"] == single["curve"]
