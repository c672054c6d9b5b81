"""Per-test-image outcomes of a run, `<run_dir>/test_outcomes.npz`: what a report needs to
recompute every accuracy image by image, so that techniques can be compared by a paired
bootstrap over the test images (`dynlab.evaluation.bootstrap`) rather than by their means alone.

A compressed numpy archive, written atomically by the end-of-run evaluations (rank zero):

- `targets` [N]: each test image's label;
- `predictions` [K,N]: the label each exit predicts (K = 1 for a static network);
- `exit_macs` [K]: the cumulative MACs to reach each exit;
- `exits` [Q,N] and `qs` [Q] (only with the budgeted evaluation): the exit (0-based) each test
  image leaves at, at each budget level q of the budgeted-batch curve.

Integer arrays take the smallest dtype that holds their values. numpy only: reports read these
files without importing torch.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynlab.atomic import atomic_open
from dynlab.errors import ResultsError

OUTCOMES_FILE = "test_outcomes.npz"


@dataclass(frozen=True)
class Outcomes:
    """One run's per-test-image outcomes (see the module docstring for the arrays)."""

    targets: np.ndarray
    predictions: np.ndarray
    exit_macs: np.ndarray
    exits: np.ndarray | None = None
    qs: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.targets.shape[0] if self.targets.ndim == 1 else -1
        num_exits = self.predictions.shape[0] if self.predictions.ndim == 2 else -1
        if n < 1 or self.predictions.shape != (num_exits, n) or num_exits < 1:
            raise ValueError(
                f"targets must be [N] and predictions [K,N]: got {self.targets.shape} and "
                f"{self.predictions.shape}"
            )
        if self.exit_macs.shape != (num_exits,):
            raise ValueError(f"exit_macs must be [{num_exits}], got {self.exit_macs.shape}")
        if (self.exits is None) != (self.qs is None):
            raise ValueError("exits and qs come together (both from the budgeted evaluation)")
        if self.exits is not None and self.qs is not None:
            if self.qs.ndim != 1 or self.exits.shape != (len(self.qs), n):
                raise ValueError(f"exits must be [Q={len(self.qs)}, N={n}], got {self.exits.shape}")
            if self.exits.size and (self.exits.min() < 0 or self.exits.max() >= num_exits):
                raise ValueError(f"exits must index the {num_exits} exits")

    @property
    def num_images(self) -> int:
        return int(self.targets.shape[0])

    def correct(self) -> np.ndarray:
        """[K,N] booleans: whether exit k labels test image i right."""
        return self.predictions == self.targets[None]

    def full_correct(self) -> np.ndarray:
        """[N] booleans at the full network (the last exit), the run's test top-1 image by image."""
        return self.correct()[-1]

    def budgeted_correct(self) -> np.ndarray | None:
        """[Q,N] booleans: whether image i is labelled right at budget level q (by its exit)."""
        if self.exits is None:
            return None
        return np.take_along_axis(self.correct(), self.exits.astype(np.intp), axis=0)

    def budgeted_macs(self) -> np.ndarray | None:
        """[Q] average MACs per test image at each budget level."""
        if self.exits is None:
            return None
        return self.exit_macs[self.exits].mean(axis=1)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays as stored: integers in their smallest dtype, absent ones left out."""
        stored = {
            "targets": _compact(self.targets),
            "predictions": _compact(self.predictions),
            "exit_macs": self.exit_macs.astype(np.float64),
        }
        if self.exits is not None and self.qs is not None:
            stored["exits"] = _compact(self.exits)
            stored["qs"] = self.qs.astype(np.float64)
        return stored


def make_outcomes(
    targets: Any,
    predictions: Any,
    exit_macs: Any,
    exits: Any | None = None,
    qs: Any | None = None,
) -> Outcomes:
    """Outcomes from array-likes (numpy arrays, CPU tensors, lists), checked for shape."""
    return Outcomes(
        targets=np.asarray(targets),
        predictions=np.asarray(predictions),
        exit_macs=np.asarray(exit_macs, dtype=np.float64),
        exits=None if exits is None else np.asarray(exits),
        qs=None if qs is None else np.asarray(qs, dtype=np.float64),
    )


def save_outcomes(run_dir: str | Path, outcomes: Outcomes) -> Path:
    """Write the run's outcomes file atomically (temp file + rename); returns its path."""
    path = Path(run_dir) / OUTCOMES_FILE
    with atomic_open(path, "wb") as f:
        np.savez_compressed(f, **outcomes.arrays())
    return path


def update_outcomes(run_dir: str | Path, outcomes: Outcomes) -> Outcomes:
    """Write `outcomes`, keeping the stored budgeted exits when it has none and the stored file
    holds the same predictions (the anytime and budgeted evaluations write in either order)."""
    if outcomes.exits is None:
        stored = load_outcomes(run_dir, missing_ok=True)
        if stored is not None and stored.exits is not None and _same_predictions(stored, outcomes):
            outcomes = stored
    save_outcomes(run_dir, outcomes)
    return outcomes


def load_outcomes(run_dir: str | Path, missing_ok: bool = True) -> Outcomes | None:
    """The run's outcomes; None when it has no file (a run older than this file, with
    `missing_ok`); `ResultsError` when the file cannot be read."""
    path = Path(run_dir) / OUTCOMES_FILE
    if not path.exists():
        if missing_ok:
            return None
        raise ResultsError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return make_outcomes(**{name: archive[name] for name in archive.files})
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as err:
        raise ResultsError(f"{path} is not a readable outcomes file ({err})") from err


def _same_predictions(a: Outcomes, b: Outcomes) -> bool:
    return (
        np.array_equal(a.targets, b.targets)
        and np.array_equal(a.predictions, b.predictions)
        and np.array_equal(a.exit_macs, b.exit_macs)
    )


def _compact(values: np.ndarray) -> np.ndarray:
    """Integers in the smallest dtype holding them (uint8 for 10 classes or up to 256 exits)."""
    if values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        return values
    low, high = values.min(), values.max()
    return values.astype(np.result_type(np.min_scalar_type(low), np.min_scalar_type(high)))
