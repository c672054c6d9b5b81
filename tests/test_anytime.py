"""anytime_records on hand-made outputs."""

from __future__ import annotations

import pytest
import torch

from dynlab.evaluation.anytime import anytime_records


def test_top1_top5_and_macs_per_exit() -> None:
    # 6 classes, 4 samples with targets 0..3. Class scores descend with the class index, except
    # where a row is listed explicitly.
    base = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0]).repeat(4, 1)
    exit1 = base.clone()  # predicts class 0 for all: top-1 only sample 0; top-5 holds 0..4
    exit2 = base.clone()
    exit2[1] = torch.tensor([5.0, 6.0, 4.0, 3.0, 2.0, 1.0])  # sample 1 correct
    exit2[3] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # sample 3 (class 3) ranked 3rd
    records = anytime_records(torch.stack([exit1, exit2]), torch.arange(4), [10.0, 25.0])
    assert records == [
        {"exit": 1, "macs": 10.0, "top1": 25.0, "top5": 100.0},
        {"exit": 2, "macs": 25.0, "top1": 50.0, "top5": 100.0},
    ]
    out_of_top5 = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]])  # target 0 ranked 6th
    assert anytime_records(out_of_top5, torch.tensor([0]), [1.0])[0]["top5"] == 0.0


def test_logits_and_probs_agree() -> None:
    logits = torch.randn(3, 50, 10, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 10, (50,))
    assert anytime_records(logits, targets, [1, 2, 3]) == anytime_records(
        logits.softmax(-1), targets, [1, 2, 3]
    )


def test_fewer_than_five_classes_counts_all_in_top5() -> None:
    records = anytime_records(torch.randn(1, 8, 3), torch.zeros(8, dtype=torch.long), [1.0])
    assert records[0]["top5"] == 100.0


def test_mismatched_inputs_fail_early() -> None:
    with pytest.raises(ValueError, match="exit_macs"):
        anytime_records(torch.randn(2, 4, 3), torch.zeros(4, dtype=torch.long), [1.0])
    with pytest.raises(ValueError, match="targets"):
        anytime_records(torch.randn(2, 4, 3), torch.zeros(5, dtype=torch.long), [1.0, 2.0])
