"""The S2DNAS controller: an LSTM that emits transformation settings, trained with REINFORCE.

S2DNAS (Yuan et al., ECCV 2020) searches the split/concat space with an RNN controller updated by
policy gradients, in the manner of NAS (Zoph & Le 2017). Decisions are emitted one per LSTM step,
layer group by layer group: its s-1 split points (categorical over 1..G-1, masked so they come out
strictly increasing), then its indicator matrix, one bit m_ij per stage i = 2..s and earlier stage
j < i. Each step's input embeds the previous decision, so later choices are conditioned on earlier
ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dynlab.techniques.s2dnas.settings import S2DSettings

SPLIT, CONCAT = "split", "concat"


@dataclass(frozen=True)
class Decision:
    """One controller step: a split point (index within its group) or an indicator bit m_ij."""

    kind: str
    layer_group: int
    index: int  # split point number 0..s-2, or stage i = 2..s for an indicator bit
    source: int = 0  # the earlier stage j = 1..i-1 of an indicator bit


class Controller(nn.Module):
    """LSTM policy over the S2D settings of a backbone with `num_layer_groups` layer groups."""

    def __init__(
        self, num_layer_groups: int, num_stages: int, groups: int, hidden_size: int = 64
    ) -> None:
        super().__init__()
        if num_stages < 2:
            raise ValueError("a search needs num_stages >= 2 (one stage has nothing to search)")
        if groups < num_stages:
            raise ValueError(f"groups={groups} cannot be split into {num_stages} stages")
        self.num_layer_groups, self.num_stages, self.groups = num_layer_groups, num_stages, groups
        self.decisions = [
            decision
            for g in range(num_layer_groups)
            for decision in (
                *(Decision(SPLIT, g, k) for k in range(num_stages - 1)),
                *(Decision(CONCAT, g, i, j) for i in range(2, num_stages + 1) for j in range(1, i)),
            )
        ]
        self.start = nn.Parameter(torch.zeros(1, hidden_size))
        self.lstm = nn.LSTMCell(hidden_size, hidden_size)
        self.embed = nn.ModuleDict(
            {SPLIT: nn.Embedding(groups - 1, hidden_size), CONCAT: nn.Embedding(2, hidden_size)}
        )
        self.heads = nn.ModuleDict(
            {SPLIT: nn.Linear(hidden_size, groups - 1), CONCAT: nn.Linear(hidden_size, 2)}
        )

    def sample(self, generator: torch.Generator) -> list[int]:
        """Tokens of one settings drawn from the policy (split tokens are point - 1)."""
        with torch.no_grad():
            return self._rollout(None, generator)[0]

    def greedy(self) -> list[int]:
        """Tokens of the most likely choice at every step."""
        with torch.no_grad():
            return self._rollout(None, None)[0]

    def log_prob_and_entropy(self, tokens: list[int]) -> tuple[Tensor, Tensor]:
        """Summed log-probability of `tokens` under the policy, and the summed step entropies."""
        _, log_prob, entropy = self._rollout(tokens, None)
        return log_prob, entropy

    def to_settings(self, tokens: list[int]) -> S2DSettings:
        """Decode tokens into settings."""
        points = [[0] * (self.num_stages - 1) for _ in range(self.num_layer_groups)]
        concat = [
            [[False] * (i - 1) for i in range(2, self.num_stages + 1)]
            for _ in range(self.num_layer_groups)
        ]
        for decision, token in zip(self.decisions, tokens, strict=True):
            if decision.kind == SPLIT:
                points[decision.layer_group][decision.index] = token + 1
            else:
                row = concat[decision.layer_group][decision.index - 2]
                row[decision.source - 1] = bool(token)
        return S2DSettings(
            tuple(map(tuple, points)),
            tuple(tuple(map(tuple, matrix)) for matrix in concat),
        )

    def _rollout(
        self, given: list[int] | None, generator: torch.Generator | None
    ) -> tuple[list[int], Tensor, Tensor]:
        """Walk the decisions: take `given` tokens, else sample with `generator`, else argmax."""
        h = c = torch.zeros_like(self.start)
        x = self.start
        tokens: list[int] = []
        log_prob = entropy = self.start.new_zeros(())
        previous_point = 0
        for step, decision in enumerate(self.decisions):
            h, c = self.lstm(x, (h, c))
            logits = self.heads[decision.kind](h)[0]
            if decision.kind == SPLIT:
                previous_point = 0 if decision.index == 0 else previous_point
                logits = logits.masked_fill(
                    ~self._valid_points(decision.index, previous_point), float("-inf")
                )
            log_probs = logits.log_softmax(dim=0)
            if given is not None:
                token = given[step]
            elif generator is not None:
                token = int(torch.multinomial(log_probs.exp(), 1, generator=generator))
            else:
                token = int(log_probs.argmax())
            if decision.kind == SPLIT:
                previous_point = token + 1
            probs = log_probs.exp()
            entropy = entropy - (probs * log_probs.nan_to_num(neginf=0.0)).sum()
            log_prob = log_prob + log_probs[token]
            tokens.append(token)
            x = self.embed[decision.kind](torch.tensor([token], device=h.device))
        return tokens, log_prob, entropy

    def _valid_points(self, index: int, previous_point: int) -> Tensor:
        """Mask over points 1..G-1: above the previous point, leaving room for the points after."""
        points = torch.arange(1, self.groups, device=self.start.device)
        last_allowed = self.groups - 1 - (self.num_stages - 2 - index)
        return (points > previous_point) & (points <= last_allowed)


class Reinforce:
    """REINFORCE with a moving-average baseline and an optional entropy bonus (Adam on the policy).

    The baseline starts at the first batch's mean reward and is moved towards each batch's mean
    before the advantages are taken, as in ENAS's released controller (Pham et al. 2018);
    loss = -mean((R - b) log p) - beta * mean(H).
    """

    def __init__(
        self, controller: Controller, lr: float, baseline_decay: float, entropy_weight: float
    ) -> None:
        self.controller = controller
        self.optimizer = torch.optim.Adam(controller.parameters(), lr=lr)
        self.baseline_decay, self.entropy_weight = baseline_decay, entropy_weight
        self.baseline: float | None = None

    def update(self, samples: list[list[int]], rewards: list[float]) -> float:
        """One policy-gradient step on `samples` (token lists) with their `rewards`; returns the loss."""
        if len(samples) != len(rewards) or not samples:
            raise ValueError(f"{len(samples)} samples for {len(rewards)} rewards")
        mean_reward = sum(rewards) / len(rewards)
        if self.baseline is None:
            self.baseline = mean_reward
        else:
            self.baseline = (
                self.baseline_decay * self.baseline + (1 - self.baseline_decay) * mean_reward
            )
        loss = self.controller.start.new_zeros(())
        for tokens, reward in zip(samples, rewards, strict=True):
            log_prob, entropy = self.controller.log_prob_and_entropy(tokens)
            loss = loss - (reward - self.baseline) * log_prob - self.entropy_weight * entropy
        loss = loss / len(samples)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {
            "controller": self.controller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "baseline": self.baseline,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = state["baseline"]
