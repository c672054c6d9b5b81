"""The LSTM controller: valid settings, reproducible sampling, and REINFORCE finding a known optimum."""

from __future__ import annotations

import pytest
import torch

from dynlab.techniques.s2dnas.controller import Controller, Reinforce


def test_samples_are_valid_settings_with_increasing_split_points() -> None:
    torch.manual_seed(0)
    controller = Controller(num_layer_groups=3, num_stages=4, groups=5)
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        settings = controller.to_settings(controller.sample(generator))
        settings.validate(num_stages=4, num_layer_groups=3, groups=5)
        seen.add(settings.split_points[0])
    assert seen == {(1, 2, 3), (1, 2, 4), (1, 3, 4), (2, 3, 4)}  # every valid choice is reachable


def test_sampling_is_reproducible_from_the_generator_state() -> None:
    controller = Controller(num_layer_groups=2, num_stages=3, groups=8)
    first = torch.Generator().manual_seed(3)
    state = first.get_state()
    a = [controller.sample(first) for _ in range(5)]
    second = torch.Generator()
    second.set_state(state)
    assert [controller.sample(second) for _ in range(5)] == a


def test_log_prob_of_a_sample_matches_its_probability_mass() -> None:
    controller = Controller(num_layer_groups=1, num_stages=2, groups=3)  # 2 points x 2 bits
    choices = [[p, b] for p in (0, 1) for b in (0, 1)]
    total = sum(controller.log_prob_and_entropy(tokens)[0].exp() for tokens in choices)
    torch.testing.assert_close(total, torch.tensor(1.0))


def test_reinforce_converges_to_the_best_settings_of_a_known_reward() -> None:
    torch.manual_seed(0)
    controller = Controller(num_layer_groups=1, num_stages=3, groups=8, hidden_size=32)
    target = [4, 6, 0, 1, 0]  # split points 5 and 7; m21 = 0, m31 = 1, m32 = 0
    learner = Reinforce(controller, lr=0.01, baseline_decay=0.9, entropy_weight=0.0)
    generator = torch.Generator().manual_seed(0)

    def reward(tokens: list[int]) -> float:  # 1 only at the target, less the more decisions differ
        return sum(a == b for a, b in zip(tokens, target, strict=True)) / len(target)

    initial = controller.log_prob_and_entropy(target)[0].exp().item()
    for _ in range(100):
        samples = [controller.sample(generator) for _ in range(4)]
        learner.update(samples, [reward(s) for s in samples])
    assert controller.greedy() == target
    assert controller.log_prob_and_entropy(target)[0].exp().item() > max(0.5, 10 * initial)


def test_one_stage_has_nothing_to_search() -> None:
    with pytest.raises(ValueError, match="num_stages >= 2"):
        Controller(num_layer_groups=3, num_stages=1, groups=8)
