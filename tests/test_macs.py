"""count_macs: known layer sizes, callables, mode restoring, and timm's ResNet-50 figure."""

from __future__ import annotations

import pytest
import timm
from torch import nn

from dynlab.evaluation.macs import count_macs


def test_linear_counts_in_times_out() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 7))
    assert count_macs(model, (3, 4, 4)) == 48 * 7


def test_conv_counts_output_positions_times_kernel() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    assert count_macs(conv, (3, 10, 10)) == 8 * 10 * 10 * (3 * 3 * 3)


def test_callable_measures_only_what_it_runs() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    first_only = count_macs(lambda x: model[0](x), (3, 10, 10), module=model)
    assert first_only == 8 * 10 * 10 * 27
    assert count_macs(model, (3, 10, 10)) == first_only + 8 * 10 * 10 * 72


def test_runs_in_eval_mode_and_restores_each_flag() -> None:
    modes_seen = []

    class Probe(nn.Module):
        def forward(self, x):
            modes_seen.append(self.training)
            return x

    model = nn.Sequential(Probe(), nn.BatchNorm2d(3))
    model.train()
    model[1].eval()  # a frozen norm layer stays frozen afterwards
    count_macs(model, (3, 2, 2))
    assert modes_seen == [False]
    assert model.training and model[0].training and not model[1].training


def test_rejects_an_input_size_that_is_not_chw() -> None:
    with pytest.raises(ValueError, match="three positive ints"):
        count_macs(nn.Identity(), (3, 224))


def test_timm_resnet50_gives_the_published_4_09_gmacs() -> None:
    model = timm.create_model("resnet50", pretrained=False)
    assert count_macs(model, (3, 224, 224)) == pytest.approx(4.09e9, rel=1e-3)
