"""Layers and conversions shared by every technique (`fuse`: BatchNorm folded for deploy forms)."""

from dynlab.nn.condense import (
    ACTIVATIONS,
    CondensedLGC,
    CondensedSFR,
    LearnedGroupConv,
    SparseFeatureReactivation,
)

__all__ = [
    "ACTIVATIONS",
    "CondensedLGC",
    "CondensedSFR",
    "LearnedGroupConv",
    "SparseFeatureReactivation",
]
