"""Paired bootstrap over test images: is a technique's accuracy different from the reference's,
or is the gap noise? Both are scored on the same test images, so each resample draws one set of
images (with replacement) for both and the difference of their accuracies on it is recorded.

numpy only (reports run without torch). Per-image scores are in [0, 1]: 1 or 0 for one run, the
fraction of runs right when several seeds are averaged; differences are in accuracy points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
SEED = 0
CONFIDENCE = 0.95
# Resamples drawn at once: their image counts [chunk, N] stay near this many entries.
_CHUNK_ENTRIES = 2**20


@dataclass(frozen=True)
class Interval:
    """Accuracy difference (entry − reference, points) on the whole test set and its interval."""

    difference: float
    low: float
    high: float

    @property
    def matches(self) -> bool:
        """The entry matches the reference: 0 lies inside the interval, or the interval above 0."""
        return self.high >= 0


def paired_bootstrap(
    entry: np.ndarray,
    reference: np.ndarray,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> list[Interval]:
    """Percentile intervals of mean(entry − reference) × 100 over resampled test images.

    `entry` is [L,N] (L operating points, e.g. budget levels) or [N], `reference` [N]; every
    point is resampled with the same images, and the same `seed` gives the same intervals.
    """
    entry = np.atleast_2d(np.asarray(entry, dtype=np.float64))
    reference = np.asarray(reference, dtype=np.float64)
    if entry.ndim != 2 or reference.shape != (entry.shape[1],) or entry.shape[1] == 0:
        raise ValueError(
            f"entry must be [L,N] or [N] and reference [N] on the same non-empty test set, "
            f"got {entry.shape} and {reference.shape}"
        )
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(
            f"need resamples >= 1 and 0 < confidence < 1, got {resamples}, {confidence}"
        )
    diff = 100.0 * (entry - reference[None])  # [L,N]
    means = _resampled_means(diff, resamples, np.random.default_rng(seed))  # [B,L]
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail], axis=0)
    return [
        Interval(float(d), float(lo), float(hi))
        for d, lo, hi in zip(diff.mean(axis=1), low, high, strict=True)
    ]


def _resampled_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[B,L] means of values [L,N] over B resamples of the N columns with replacement.

    Each resample is counted as how often it draws each image, so a chunk of resamples is one
    matrix product instead of a [B,L,N] gather.
    """
    n = values.shape[1]
    chunk = max(1, _CHUNK_ENTRIES // n)
    means = np.empty((resamples, values.shape[0]))
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        drawn = rng.integers(0, n, size=(size, n)) + n * np.arange(size)[:, None]
        counts = np.bincount(drawn.ravel(), minlength=size * n).reshape(size, n)
        means[start : start + size] = counts @ values.T / n
    return means
