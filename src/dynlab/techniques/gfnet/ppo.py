"""Stage 2 of GFNet: the patch policy trained by PPO on the classifier's confidence gains.

Schulman et al. 2017's clipped surrogate as the official network.py `PPO.update` uses it: one
update per batch, the reward of a focus step is the gain in the true class's softmax probability
(train.py: confidence_t - confidence_{t-1}), returns discounted with gamma and normalised over the
whole batch (every DDP process's share of it), loss = -min(surr1, surr2) + 0.5 MSE(value, return)
- 0.01 entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from dynlab.techniques.gfnet.config import PPOConfig
from dynlab.techniques.gfnet.model import PatchPolicy, StepOutput


@dataclass
class Episode:
    """A batch's focus steps: the maps the policy read [S,B,C,H,W], its actions [S,B,2], their
    log-probabilities [S,B] at acting time and the rewards [S,B] (S = T - 1)."""

    states: Tensor
    actions: Tensor
    logprobs: Tensor
    rewards: Tensor


def true_class_confidence(steps: list[StepOutput], y: Tensor) -> Tensor:
    """softmax(logits_t)[y] of every step: [T,B]."""
    return torch.stack([s.logits.detach().softmax(-1).gather(1, y[:, None])[:, 0] for s in steps])


def episode(steps: list[StepOutput], y: Tensor) -> Episode:
    """The PPO episode of a rollout whose focus steps sampled the policy."""
    focus = steps[1:]
    if any(s.logprob is None for s in focus):
        raise ValueError("a PPO episode needs focus steps sampled from the policy (Locate.sample)")
    confidence = true_class_confidence(steps, y)
    return Episode(
        states=torch.stack([s.policy_input for s in focus]),  # type: ignore[misc]
        actions=torch.stack([s.location for s in focus]),  # type: ignore[misc]
        logprobs=torch.stack([s.logprob for s in focus]),  # type: ignore[misc]
        rewards=confidence[1:] - confidence[:-1],
    )


def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """R_t = r_t + gamma R_{t+1} along the first (time) dimension."""
    returns, running = torch.empty_like(rewards), torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[t] + gamma * running
        returns[t] = running
    return returns


def normalise_over_ranks(returns: Tensor) -> Tensor:
    """(returns - mean) / (std + 1e-5), mean and (unbiased) std over every process's returns.

    The official code normalises over its whole batch of 256 on one DataParallel process
    (network.py `PPO.update`); under DDP each process holds 1/world of that batch, so the moments
    are summed across processes first and the result equals normalising the gathered batch. One
    process computes the official expression itself.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        spread = returns.std() if returns.numel() > 1 else returns.new_zeros(())
        return (returns - returns.mean()) / (spread + 1e-5)
    moments = torch.stack(
        [returns.new_tensor(returns.numel()), returns.sum(), returns.square().sum()]
    )
    moments = moments.double()
    dist.all_reduce(moments)
    count, total, squares = moments.unbind()
    mean = total / count
    spread = ((squares - count * mean**2).clamp_min(0) / (count - 1).clamp_min(1)).sqrt()
    return ((returns.double() - mean) / (spread + 1e-5)).to(returns.dtype)


def ppo_loss(policy: PatchPolicy, ep: Episode, cfg: PPOConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped-surrogate loss of one batch's episode and what to log about it."""
    returns = normalise_over_ranks(discounted_returns(ep.rewards, cfg.gamma))
    logprobs, values, entropy = policy.evaluate(ep.states, ep.actions)
    ratios = torch.exp(logprobs - ep.logprobs.detach())
    advantages = returns - values.detach()
    surrogate = torch.min(
        ratios * advantages, torch.clamp(ratios, 1 - cfg.clip, 1 + cfg.clip) * advantages
    )
    loss = (
        -surrogate + cfg.value_weight * F.mse_loss(values, returns) - cfg.entropy_weight * entropy
    ).mean()
    stats = {
        "reward": ep.rewards.sum(0).mean(),
        "value_loss": F.mse_loss(values, returns),
        # pi_new / pi_old: 1 on a batch's single update unless numerics (bf16) move it
        "ratio": ratios.detach().mean(),
    }
    return loss, stats
