"""The searchable settings of the S2D transformation: split points and indicator matrices, validated.

A backbone's partitioned layers fall into layer groups (same feature-map size, see `analysis.py`).
Each layer's channels are cut into G equal groups; per layer group, s-1 increasing split points in
1..G-1 give stage k the channel groups between split points k-1 and k. Per layer group, the
indicator matrix m_ij (j < i) says whether stage i's layers also read stage j's features of the
layer before: S2DNAS (Yuan et al., ECCV 2020, Sec. 3) shares split points and the indicator matrix
among the layers of one feature-map size, and its last layer reuses every earlier stage.

dynlab first had one bit per (stage i, layer group) meaning "read all of stages 1..i-1"; that form
still loads (`resolve_settings`, `S2DSettings.from_dict`): it is the matrix with row i all equal to
that bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# [layer group][stage i - 2][stage j - 1], j < i: an indicator matrix (lower triangle) per group
Concat = tuple[tuple[tuple[bool, ...], ...], ...]


class SettingsError(ValueError):
    """Split points or indicator matrices that do not fit the backbone's layer groups or stages."""


@dataclass(frozen=True)
class S2DSettings:
    """Split points [layer group][s-1] and indicator matrices [layer group][stage 2..s][j < i]."""

    split_points: tuple[tuple[int, ...], ...]
    concat: Concat

    @property
    def num_stages(self) -> int:
        return len(self.split_points[0]) + 1 if self.split_points else 1

    @property
    def num_layer_groups(self) -> int:
        return len(self.split_points)

    def reads(self, layer_group: int, stage: int) -> tuple[int, ...]:
        """The earlier stages (0-based) whose features stage `stage` (0-based) reads in
        `layer_group`, in order."""
        if stage == 0:
            return ()
        row = self.concat[layer_group][stage - 1]
        return tuple(j for j, bit in enumerate(row) if bit)

    def validate(self, num_stages: int, num_layer_groups: int, groups: int) -> None:
        """Raise SettingsError naming the first entry that does not fit."""
        if len(self.split_points) != num_layer_groups:
            raise SettingsError(
                f"split_points has {len(self.split_points)} entries but the backbone has "
                f"{num_layer_groups} layer groups (feature-map sizes); give one entry per group or "
                "a single entry shared by all"
            )
        if len(self.concat) != num_layer_groups:
            raise SettingsError(
                f"concat has {len(self.concat)} indicator matrices but the backbone has "
                f"{num_layer_groups} layer groups; give one per group or a single one for all"
            )
        for g, points in enumerate(self.split_points):
            if len(points) != num_stages - 1:
                raise SettingsError(
                    f"split_points[{g}] = {list(points)} has {len(points)} points; "
                    f"{num_stages} stages need {num_stages - 1}"
                )
            if any(not 1 <= p <= groups - 1 for p in points):
                raise SettingsError(
                    f"split_points[{g}] = {list(points)}: every point must be in 1..{groups - 1} "
                    f"(groups={groups})"
                )
            if any(b <= a for a, b in zip(points, points[1:], strict=False)):
                raise SettingsError(
                    f"split_points[{g}] = {list(points)} must be strictly increasing"
                )
        for g, matrix in enumerate(self.concat):
            if len(matrix) != num_stages - 1:
                raise SettingsError(
                    f"concat[{g}] has {len(matrix)} rows; {num_stages} stages need "
                    f"{num_stages - 1} (stages 2..{num_stages})"
                )
            for i, row in enumerate(matrix, start=2):
                if len(row) != i - 1:
                    raise SettingsError(
                        f"concat[{g}] row of stage {i} has {len(row)} bits; it needs {i - 1} "
                        f"(one per earlier stage 1..{i - 1})"
                    )

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, for JSON files and checkpoints."""
        return {
            "split_points": [list(p) for p in self.split_points],
            "concat": [[list(row) for row in matrix] for matrix in self.concat],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> S2DSettings:
        """Inverse of `to_dict`; also reads the earlier per-stage bits (records and checkpoints
        written before the indicator matrix)."""
        split_points = tuple(tuple(int(p) for p in points) for points in data["split_points"])
        num_stages = len(split_points[0]) + 1 if split_points else 1
        concat = _matrices(data["concat"], num_stages, len(split_points))
        return cls(split_points=split_points, concat=concat)


def equal_split_points(num_stages: int, groups: int) -> tuple[int, ...]:
    """Split points giving each stage about G/s groups; the remainder goes to the later stages."""
    return tuple(k * groups // num_stages for k in range(1, num_stages))


def resolve_settings(
    split_points: Sequence[Sequence[int]] | None,
    concat: Sequence[Sequence[bool]] | None,
    num_stages: int,
    num_layer_groups: int,
    groups: int,
) -> S2DSettings:
    """Settings from config values: None means equal split / concat everywhere, and a single
    entry (one split-point list, or one bit in a concat row) is shared by every layer group."""
    if num_stages < 1:
        raise SettingsError(f"num_stages must be >= 1, got {num_stages}")
    if groups < num_stages:
        raise SettingsError(f"groups={groups} cannot be split into num_stages={num_stages} stages")
    if split_points is None:
        split_points = [equal_split_points(num_stages, groups)]
    if len(split_points) == 1:
        split_points = list(split_points) * num_layer_groups
    settings = S2DSettings(
        split_points=tuple(tuple(int(p) for p in points) for points in split_points),
        concat=_matrices(concat, num_stages, num_layer_groups),
    )
    settings.validate(num_stages, num_layer_groups, groups)
    return settings


def full_matrices(num_stages: int, num_layer_groups: int) -> Concat:
    """Every stage reads every earlier stage, in every layer group."""
    matrix = tuple(tuple([True] * (i - 1)) for i in range(2, num_stages + 1))
    return (matrix,) * num_layer_groups


def _matrices(concat: Sequence[Any] | None, num_stages: int, num_layer_groups: int) -> Concat:
    """Indicator matrices from a config or record value: None (all ones), one matrix per layer
    group or one for all, or the earlier form (rows per stage 2..s of one bit per layer group, or
    one bit for all groups), whose bit b means row i = [b] * (i - 1)."""
    if concat is None:
        return full_matrices(num_stages, num_layer_groups)
    rows = list(concat)
    if rows and rows[0] and not isinstance(rows[0][0], Sequence):  # the earlier form
        if len(rows) != num_stages - 1:
            raise SettingsError(
                f"concat has {len(rows)} rows of per-stage bits; {num_stages} stages need "
                f"{num_stages - 1}. The indicator-matrix form is one list per layer group of rows "
                "for stages 2..s, row i holding i-1 bits (e.g. [[[true], [true, false]]])"
            )
        bits = [list(row) * num_layer_groups if len(row) == 1 else list(row) for row in rows]
        return tuple(
            tuple(tuple([bool(bits[i - 2][g])] * (i - 1)) for i in range(2, num_stages + 1))
            for g in range(len(bits[0]) if bits else num_layer_groups)
        )
    if not rows:  # one stage: nothing to read; or no matrices given
        return tuple(() for _ in range(num_layer_groups)) if num_stages == 1 else ()
    matrices = [tuple(tuple(bool(b) for b in row) for row in matrix) for matrix in rows]
    if len(matrices) == 1:
        matrices = matrices * num_layer_groups
    return tuple(matrices)
