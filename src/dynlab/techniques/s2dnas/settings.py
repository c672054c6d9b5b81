"""The searchable settings of the S2D transformation: split points and concat bits, validated.

A backbone's partitioned layers fall into layer groups (same feature-map size, see `analysis.py`).
Each layer's channels are cut into G equal groups; per layer group, s-1 increasing split points in
1..G-1 give stage k the channel groups between split points k-1 and k. Per stage k >= 2 and layer
group, one concat bit says whether that stage's layers also read stages 1..k-1 of the layer before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class SettingsError(ValueError):
    """Split points or concat bits that do not fit the backbone's layer groups or the stage count."""


@dataclass(frozen=True)
class S2DSettings:
    """Split points [layer group][s-1] and concat bits [stage 2..s][layer group]."""

    split_points: tuple[tuple[int, ...], ...]
    concat: tuple[tuple[bool, ...], ...]

    @property
    def num_stages(self) -> int:
        return len(self.concat) + 1

    @property
    def num_layer_groups(self) -> int:
        return len(self.split_points)

    def validate(self, num_stages: int, num_layer_groups: int, groups: int) -> None:
        """Raise SettingsError naming the first entry that does not fit."""
        if len(self.split_points) != num_layer_groups:
            raise SettingsError(
                f"split_points has {len(self.split_points)} entries but the backbone has "
                f"{num_layer_groups} layer groups (feature-map sizes); give one entry per group or "
                "a single entry shared by all"
            )
        if len(self.concat) != num_stages - 1:
            raise SettingsError(
                f"concat has {len(self.concat)} rows but {num_stages} stages need {num_stages - 1} "
                "(one per stage after the first)"
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
        for k, row in enumerate(self.concat, start=2):
            if len(row) != num_layer_groups:
                raise SettingsError(
                    f"concat row of stage {k} has {len(row)} bits for {num_layer_groups} layer groups"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, for JSON files and checkpoints."""
        return {
            "split_points": [list(p) for p in self.split_points],
            "concat": [list(r) for r in self.concat],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> S2DSettings:
        """Inverse of `to_dict`."""
        return cls(
            split_points=tuple(tuple(int(p) for p in points) for points in data["split_points"]),
            concat=tuple(tuple(bool(b) for b in row) for row in data["concat"]),
        )


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
    if concat is None:
        concat = [[True]] * (num_stages - 1)
    if len(split_points) == 1:
        split_points = list(split_points) * num_layer_groups
    concat = [list(row) * num_layer_groups if len(row) == 1 else row for row in concat]
    settings = S2DSettings(
        split_points=tuple(tuple(int(p) for p in points) for points in split_points),
        concat=tuple(tuple(bool(b) for b in row) for row in concat),
    )
    settings.validate(num_stages, num_layer_groups, groups)
    return settings
