"""Anytime prediction: the accuracy of every exit on its own, next to the MACs to reach it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor


def anytime_records(
    logits_or_probs: Tensor, targets: Tensor, exit_macs: Sequence[float]
) -> list[dict[str, Any]]:
    """One record per exit: `exit` (1-based), cumulative `macs`, `top1` and `top5` (%).

    `logits_or_probs` is [K,N,C]: ranks are all that matter, so logits and softmax give the same.
    With fewer than 5 classes, top-5 counts every class and is 100%.
    """
    if logits_or_probs.ndim != 3 or 0 in logits_or_probs.shape:
        raise ValueError(
            f"expected a non-empty [K, N, C] tensor, got {tuple(logits_or_probs.shape)}"
        )
    num_exits, n, num_classes = logits_or_probs.shape
    if targets.shape != (n,):
        raise ValueError(f"targets must have shape ({n},), got {tuple(targets.shape)}")
    if len(exit_macs) != num_exits:
        raise ValueError(f"exit_macs has {len(exit_macs)} entries for {num_exits} exits")
    top5 = logits_or_probs.topk(min(5, num_classes), dim=2).indices  # [K,N,5]
    hits = top5 == targets.to(top5.device)[None, :, None]
    top1_correct = hits[..., 0].sum(dim=1).tolist()
    top5_correct = hits.any(dim=2).sum(dim=1).tolist()
    return [
        {
            "exit": k + 1,
            "macs": float(exit_macs[k]),
            "top1": 100.0 * top1_correct[k] / n,
            "top5": 100.0 * top5_correct[k] / n,
        }
        for k in range(num_exits)
    ]
