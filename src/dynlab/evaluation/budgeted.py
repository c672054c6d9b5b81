"""Budgeted-batch classification: MSDNet's procedure as vectorised tensor functions.

Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image Classification", ICLR 2018,
Sec. 5 and their PyTorch code (kalviny/MSDNet-PyTorch `adaptive_inference.py`:
`dynamic_eval_find_threshold` / `dynamic_eval_with_threshold`).
For a budget level q, a fraction p_k ∝ q^k of the samples is meant to leave at exit k. Thresholds
on the confidence (max softmax probability) are calibrated on `val`, which is always the held-out
calibration split carved from the training data, never the test set; test samples then exit at the
first exit whose confidence reaches its threshold. Sweeping q traces accuracy against average MACs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

# MSDNet's budget levels: q = 0.05, 0.10, ..., 1.95 (39 levels).
DEFAULT_QS: tuple[float, ...] = tuple(i / 20 for i in range(1, 40))


def exit_distribution(q: float, num_exits: int) -> Tensor:
    """Fraction of samples meant to leave at each exit at budget level q: q^k / sum_j q^j."""
    if not q > 0:
        raise ValueError(f"budget level q must be > 0, got {q}")
    if num_exits < 1:
        raise ValueError(f"num_exits must be >= 1, got {num_exits}")
    # q^k normalised, as a softmax of k*log(q) so that large q or many exits cannot overflow.
    k = torch.arange(1, num_exits + 1, dtype=torch.float64)
    return torch.softmax(k * math.log(q), dim=0)


def calibrate_thresholds(val_probs: Tensor, p: Tensor) -> Tensor:
    """Confidence threshold of each exit [K] so that floor(N * p_k) val samples leave at exit k.

    `val_probs` [K,N,C] are softmax outputs on the calibration split (never test). An exit where
    nobody leaves gets +inf; the last exit gets -inf (it takes everything left).
    """
    conf, _ = _confidences(val_probs, "val_probs")
    return _thresholds(
        conf, conf.argsort(dim=1, descending=True), _check_distribution(p, len(conf))
    )


def exit_indices(probs: Tensor, thresholds: Tensor | Sequence[float]) -> Tensor:
    """Exit [N] (0-based) of each sample: the first k with confidence >= thresholds[k], else K-1."""
    conf, _ = _confidences(probs, "probs")
    thresholds = torch.as_tensor(thresholds, dtype=conf.dtype, device=conf.device)
    if thresholds.shape != (len(conf),):
        raise ValueError(
            f"thresholds must have shape ({len(conf)},), got {tuple(thresholds.shape)}"
        )
    return _first_exit(conf, thresholds)


def budgeted_curve(
    val_probs: Tensor,
    val_targets: Tensor,
    test_probs: Tensor,
    test_targets: Tensor,
    exit_macs: Sequence[float],
    qs: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """One record per budget level q: test top-1 (%) against average MACs per sample.

    `val_*` is the held-out calibration split (never test), `test_*` the split that is reported;
    probs are [K,N,C] softmax outputs, `exit_macs` the cumulative MACs to reach each exit. Records
    hold `q`, `avg_macs`, `accuracy`, `thresholds` (K), `exit_fractions` (K, on test) and
    `val_accuracy` (top-1 % on the calibration split at the same thresholds).
    """
    return budgeted_curve_and_exits(
        val_probs, val_targets, test_probs, test_targets, exit_macs, qs
    )[0]


def budgeted_curve_and_exits(
    val_probs: Tensor | None,
    val_targets: Tensor | None,
    test_probs: Tensor,
    test_targets: Tensor,
    exit_macs: Sequence[float],
    qs: Sequence[float] | None = None,
) -> tuple[list[dict[str, Any]], Tensor]:
    """`budgeted_curve`'s records and the exit [Q,N] (0-based, on CPU) each test sample takes at
    each level: the per-image outcomes that let a report resample the test set. A network with
    one exit has no thresholds to calibrate: its val may be None (a run that held nothing out)."""
    if val_probs is None or val_targets is None:
        if test_probs.shape[0] != 1:
            raise ValueError("the exit thresholds of a multi-exit network need the val split")
        val_probs, val_targets = test_probs[:, :0], test_targets[:0]
    test_conf, test_pred = _confidences(test_probs, "test_probs")
    calibrated = val_probs.shape[1] > 0
    val_conf, val_pred = _confidences(val_probs, "val_probs") if calibrated else (test_conf, None)
    num_exits = len(val_conf)
    _check_splits(val_probs, val_targets, test_probs, test_targets, exit_macs)
    test_correct = test_pred == test_targets.to(test_pred.device)[None]
    order = val_conf.argsort(dim=1, descending=True)
    macs = torch.tensor([float(m) for m in exit_macs], dtype=torch.float64)
    records, all_exits = [], []
    for q in DEFAULT_QS if qs is None else qs:
        thresholds = _thresholds(val_conf, order, exit_distribution(q, num_exits))
        test_exits = _first_exit(test_conf, thresholds)
        all_exits.append(test_exits.cpu())
        fractions = torch.bincount(test_exits, minlength=num_exits).cpu().double() / len(test_exits)
        val_accuracy = None
        if val_pred is not None:
            val_correct = val_pred == val_targets.to(val_pred.device)[None]
            val_accuracy = _percent_correct(val_correct, _first_exit(val_conf, thresholds))
        records.append(
            {
                "q": float(q),
                "avg_macs": float((fractions * macs).sum()),
                "accuracy": _percent_correct(test_correct, test_exits),
                "thresholds": thresholds.tolist(),
                "exit_fractions": fractions.tolist(),
                "val_accuracy": val_accuracy,
            }
        )
    if not all_exits:
        return records, torch.empty((0, test_conf.shape[1]), dtype=torch.long)
    return records, torch.stack(all_exits)


def _thresholds(conf: Tensor, order: Tensor, p: Tensor) -> Tensor:
    """MSDNet's threshold rule on confidences conf [K,N]; order [K,N] sorts each exit descending."""
    num_exits, n = conf.shape
    thresholds = torch.full((num_exits,), math.inf, dtype=conf.dtype, device=conf.device)
    thresholds[-1] = -math.inf  # the last exit takes everything left
    exited = torch.zeros(n, dtype=torch.bool, device=conf.device)
    for k in range(num_exits - 1):
        quota = math.floor(n * float(p[k]))  # counted against all N samples, not those remaining
        if quota > 0:
            # Walk exit k's samples by descending confidence, skipping those gone at earlier exits:
            # the threshold is the confidence of the quota-th one reached (none if too few remain).
            reached = (~exited[order[k]]).cumsum(dim=0)
            position = int(torch.searchsorted(reached, quota))
            if position < n:
                thresholds[k] = conf[k, order[k, position]]
        exited |= conf[k] >= thresholds[k]  # `>=`: samples tied with the threshold exit together
    return thresholds


def _first_exit(conf: Tensor, thresholds: Tensor) -> Tensor:
    """Index of the first exit whose confidence reaches its threshold; the last exit otherwise."""
    exits = torch.full((conf.shape[1],), len(conf) - 1, device=conf.device)
    for k in reversed(range(len(conf) - 1)):  # earlier exits overwrite later ones
        exits = torch.where(conf[k] >= thresholds[k], k, exits)
    return exits


def _percent_correct(correct: Tensor, exits: Tensor) -> float:
    """Top-1 (%) when sample i is answered by exit exits[i]; correct is [K,N] booleans."""
    return 100.0 * int(correct.gather(0, exits[None]).sum()) / len(exits)


def _confidences(probs: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Max softmax probability and predicted class, both [K,N], of probs [K,N,C]."""
    if probs.ndim != 3 or 0 in probs.shape:
        raise ValueError(
            f"{name} must be a non-empty [K exits, N, C classes] tensor, got {tuple(probs.shape)}"
        )
    conf, pred = probs.max(dim=2)
    if conf.min() < 0 or conf.max() > 1:
        raise ValueError(
            f"{name} must hold softmax probabilities (max in [0, 1]); were logits passed?"
        )
    return conf, pred


def _check_distribution(p: Tensor, num_exits: int) -> Tensor:
    """`p` as a float64 CPU tensor of shape [K], with a clear error for a wrong length."""
    p = torch.as_tensor(p, dtype=torch.float64).cpu()
    if p.shape != (num_exits,):
        raise ValueError(
            f"p must have one fraction per exit ({num_exits}), got shape {tuple(p.shape)}"
        )
    return p


def _check_splits(
    val_probs: Tensor,
    val_targets: Tensor,
    test_probs: Tensor,
    test_targets: Tensor,
    exit_macs: Sequence[float],
) -> None:
    """Fail early, naming the mismatch, when the two splits and the MACs do not fit together."""
    (kv, nv, cv), (kt, nt, ct) = val_probs.shape, test_probs.shape
    if (kv, cv) != (kt, ct):
        raise ValueError(f"val has {kv} exits x {cv} classes but test has {kt} x {ct}")
    if val_targets.shape != (nv,) or test_targets.shape != (nt,):
        raise ValueError(
            f"targets must be [N]: val {tuple(val_targets.shape)} for {nv} samples, "
            f"test {tuple(test_targets.shape)} for {nt} samples"
        )
    if len(exit_macs) != kv:
        raise ValueError(f"exit_macs has {len(exit_macs)} entries for {kv} exits")
