"""The budgeted-batch rule written as the plain per-sample loop of MSDNet's released code
(kalviny/MSDNet-PyTorch `adaptive_inference.py`).

It is the yardstick for `dynlab.evaluation.budgeted.budgeted_curve`: tests check both give the same
records and `benchmarks/budgeted.py` times both. `val` is the held-out calibration split,
never test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from dynlab.evaluation.budgeted import DEFAULT_QS, exit_distribution


def budgeted_curve_loop(
    val_probs: Tensor,
    val_targets: Tensor,
    test_probs: Tensor,
    test_targets: Tensor,
    exit_macs: Sequence[float],
    qs: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Same contract and records as `budgeted_curve`, one Python step per sample (slow, obvious)."""
    val_conf, val_pred = (t.tolist() for t in val_probs.max(dim=2))
    test_conf, test_pred = (t.tolist() for t in test_probs.max(dim=2))
    val_y, test_y = val_targets.tolist(), test_targets.tolist()
    num_exits, n_val = len(val_conf), len(val_y)
    by_confidence = [sorted(range(n_val), key=lambda i, c=c: -c[i]) for c in val_conf]
    records = []
    for q in DEFAULT_QS if qs is None else qs:
        p = exit_distribution(q, num_exits).tolist()
        thresholds = [math.inf] * (num_exits - 1) + [-math.inf]
        exited = [False] * n_val
        for k in range(num_exits - 1):
            quota, count = math.floor(n_val * p[k]), 0
            for i in by_confidence[k]:
                if not exited[i]:
                    count += 1
                    if count == quota:
                        thresholds[k] = val_conf[k][i]
                        break
            for i in range(n_val):
                if val_conf[k][i] >= thresholds[k]:
                    exited[i] = True
        counts, correct = _evaluate(test_conf, test_pred, test_y, thresholds)
        _, val_correct = _evaluate(val_conf, val_pred, val_y, thresholds)
        fractions = [c / len(test_y) for c in counts]
        records.append(
            {
                "q": float(q),
                "avg_macs": sum(f * float(m) for f, m in zip(fractions, exit_macs, strict=True)),
                "accuracy": 100.0 * correct / len(test_y),
                "thresholds": thresholds,
                "exit_fractions": fractions,
                "val_accuracy": 100.0 * val_correct / n_val,
            }
        )
    return records


def _evaluate(
    conf: list[list[float]], pred: list[list[int]], targets: list[int], thresholds: list[float]
) -> tuple[list[int], int]:
    """Samples leaving at each exit and the number answered correctly, sample by sample."""
    num_exits = len(thresholds)
    counts, correct = [0] * num_exits, 0
    for i, y in enumerate(targets):
        for k in range(num_exits):
            if k == num_exits - 1 or conf[k][i] >= thresholds[k]:
                counts[k] += 1
                correct += pred[k][i] == y
                break
    return counts, correct
