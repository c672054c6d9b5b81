"""How well an ordering of architectures (a supernet's inherited-weight accuracy, or a control:
parameter count, MACs, a random order) agrees with their accuracy trained alone: Kendall's tau-b
and Spearman's rho with percentile bootstrap intervals over the architectures, tau within the true
top-k, and the overlap of the two top-k sets. Pure numpy/scipy on lists of scores."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

__all__ = ["Agreement", "agreement", "top_k_overlap"]


@dataclass(frozen=True)
class Agreement:
    """An ordering's agreement with the truth over n architectures (intervals: 95 % bootstrap)."""

    n: int
    tau: float
    tau_low: float
    tau_high: float
    rho: float
    rho_low: float
    rho_high: float
    top_k: int
    top_k_tau: float  # tau among the k best architectures by the truth
    top_k_overlap: float  # |top-k by the ordering and by the truth| / k

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def agreement(
    proxy: Sequence[float],
    truth: Sequence[float],
    top_k: int,
    resamples: int,
    rng: np.random.Generator,
) -> Agreement:
    """The agreement of `proxy` with `truth` (same architectures, same order; higher is better in
    both). The bootstrap resamples architectures with replacement (`resamples` times, paired);
    resamples where either side is constant (no ordering) are left out of the interval."""
    p, t = np.asarray(proxy, dtype=float), np.asarray(truth, dtype=float)
    if p.shape != t.shape or p.ndim != 1 or len(p) < 3:
        raise ValueError(f"agreement needs two equal-length lists of >= 3 scores, got {p.shape}")
    taus, rhos = [], []
    for _ in range(resamples):
        idx = rng.integers(0, len(p), len(p))
        tau, rho = _tau(p[idx], t[idx]), _rho(p[idx], t[idx])
        if math.isfinite(tau) and math.isfinite(rho):
            taus.append(tau)
            rhos.append(rho)
    k = min(top_k, len(p))
    best = np.argsort(-t, kind="stable")[:k]
    tau_low, tau_high = _interval(taus)
    rho_low, rho_high = _interval(rhos)
    return Agreement(
        n=len(p),
        tau=_tau(p, t),
        tau_low=tau_low,
        tau_high=tau_high,
        rho=_rho(p, t),
        rho_low=rho_low,
        rho_high=rho_high,
        top_k=k,
        top_k_tau=_tau(p[best], t[best]) if k >= 2 else math.nan,
        top_k_overlap=top_k_overlap(p, t, k),
    )


def top_k_overlap(proxy: Sequence[float], truth: Sequence[float], k: int) -> float:
    """The share of the `k` best by `truth` that are also among the `k` best by `proxy` (ties
    broken by position, the same way for both)."""
    p, t = np.asarray(proxy, dtype=float), np.asarray(truth, dtype=float)
    a = set(np.argsort(-p, kind="stable")[:k].tolist())
    b = set(np.argsort(-t, kind="stable")[:k].tolist())
    return len(a & b) / k


def _tau(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.kendalltau(a, b).statistic)  # tau-b: ties in either list counted


def _rho(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def _interval(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)
