"""Angle-based shrinking (Hu et al., ECCV 2020, Sec. 3; official megvii-model/AngleNAS
SPOS/shrinking/shrinking.py): the angle of a path, the score of an operator (the mean angle of
paths through it) and the drop of the lowest-scored operators.

An operator is a (layer, choice) pair of the shrunk genes (the block ids of an SPOS space; its
channel scales, when searched, are not shrunk). The angle of a path is the angle between the
concatenated conv and classifier weights it runs through (`path_weights`: no BN, no biases, as the
official get_arch_vector) at the reference (the initial weights, later the weights of the swap) and
now. A path's vector is a concatenation of pieces shared by many paths, so each piece's dot product
and squared norms are computed once and a path's cosine is summed from them: the same angle as
the concatenation, thousands of paths at the cost of a few.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

Genes = tuple[int, ...]
Operator = tuple[int, int]  # (layer, choice)


@dataclass
class ShrunkSpace:
    """The choices left in each shrunk gene (layer) and the other genes' choice counts (channel
    scales, never shrunk). A candidate is a flat tuple: the layers' choices, then the others."""

    operations: list[list[int]]
    other_choices: list[int] = field(default_factory=list)

    @classmethod
    def full(cls, layer_choices: Sequence[int], other_choices: Sequence[int] = ()) -> ShrunkSpace:
        return cls([list(range(n)) for n in layer_choices], [int(n) for n in other_choices])

    @property
    def size(self) -> float:
        """Architectures of the shrunk genes (official nas_utils.py get_space_size: a product,
        every choice counted)."""
        return float(math.prod(len(ops) for ops in self.operations))

    def gene_values(self) -> list[list[int]]:
        """Every gene's allowed values, the evolution's restricted space."""
        return [list(ops) for ops in self.operations] + [list(range(n)) for n in self.other_choices]

    def contains(self, genes: Sequence[int]) -> bool:
        layers = genes[: len(self.operations)]
        return all(int(g) in ops for g, ops in zip(layers, self.operations, strict=True))

    def sample(self, rng: np.random.Generator) -> Genes:
        """Every gene uniform over its values (official shrinking/train.py: each layer uniform over
        its remaining operators)."""
        return tuple(int(vs[int(rng.integers(len(vs)))]) for vs in self.gene_values())

    def drop(self, operators: Sequence[Operator]) -> None:
        for layer, choice in operators:
            self.operations[layer].remove(choice)


class AngleMeter:
    """Angles of paths between the reference weights (`reference`, a copy of the supernet) and the
    supernet now; pieces are cached, so the meter is for one set of weights (make a new one after
    the supernet trains)."""

    def __init__(self, supernet: nn.Module, reference: nn.Module) -> None:
        self.now, self.ref = supernet, reference
        self._pieces: dict[Any, tuple[float, float, float]] = {}

    @torch.no_grad()
    def angle(self, genes: Sequence[int]) -> float:
        """arccos of the cosine between the path's weight vectors (official shrinking.py
        get_angle: CosineSimilarity, then acos), in radians."""
        dot = ref_sq = now_sq = 0.0
        reference = None
        for name, weight in self.now.path_weights(genes):  # type: ignore[operator]
            if name not in self._pieces:
                if reference is None:
                    reference = dict(self.ref.path_weights(genes))  # type: ignore[operator]
                r, w = reference[name].double(), weight.double()
                self._pieces[name] = (
                    float((r * w).sum()),
                    float((r * r).sum()),
                    float((w * w).sum()),
                )
            d, rr, ww = self._pieces[name]
            dot, ref_sq, now_sq = dot + d, ref_sq + rr, now_sq + ww
        # torch's CosineSimilarity divides by max(|a| |b|, eps), eps 1e-8.
        cosine = dot / max(math.sqrt(ref_sq * now_sq), 1e-8)
        return math.acos(min(1.0, max(-1.0, cosine)))


def score_operators(
    space: ShrunkSpace,
    angle_of: Callable[[Genes], float],
    rng: np.random.Generator,
    paths_per_operator: int,
    identity: int | None = None,
    macs_of: Callable[[Genes], float] | None = None,
    max_macs: float | None = None,
) -> dict[Operator, float]:
    """Every operator of a layer with two or more choices left, scored by the mean angle of up
    to `paths_per_operator` distinct paths through it (official shrinking.py compute_scores).

    As the official code: the operators are visited in order; each draws paths with its layer
    fixed to it (the others uniform over their non-identity choices, then, when the space has an
    `identity` choice, a uniform number of the layers that allow it set to identity: official
    sample_depth) until its pool holds `paths_per_operator`, refusing paths seen in this call or
    over `max_macs`, and at most 100 x that many tries; every path joins the pool of every scored
    operator it passes through, and an operator's score averages the first `paths_per_operator`
    of its pool.
    """
    scored = [
        (layer, choice)
        for layer, ops in enumerate(space.operations)
        if len(ops) > 1
        for choice in ops
    ]
    pools: dict[Operator, list[Genes]] = {op: [] for op in scored}
    seen: set[Genes] = set()
    angles: dict[Genes, float] = {}
    layers = len(space.operations)
    for layer, choice in scored:
        pool = pools[(layer, choice)]
        for _ in range(100 * paths_per_operator):
            if len(pool) >= paths_per_operator:
                break
            genes = _scoring_path(space, rng, layer, choice, identity)
            if genes in seen:
                continue
            if max_macs is not None and macs_of is not None and macs_of(genes) > max_macs:
                continue
            seen.add(genes)
            for i in range(layers):
                if (i, genes[i]) in pools:
                    pools[(i, genes[i])].append(genes)
    scores: dict[Operator, float] = {}
    for op, pool in pools.items():
        paths = pool[:paths_per_operator]
        if not paths:
            continue  # no legal path through it (all over the MACs cap): never dropped for it
        for genes in paths:
            if genes not in angles:
                angles[genes] = angle_of(genes)
        scores[op] = math.fsum(angles[g] for g in paths) / len(paths)
    return scores


def _scoring_path(
    space: ShrunkSpace, rng: np.random.Generator, layer: int, choice: int, identity: int | None
) -> Genes:
    """A path through (layer, choice): official shrinking.py sample_cand_with_op and
    sample_depth."""
    picks = []
    for i, ops in enumerate(space.operations):
        if i == layer:
            picks.append(choice)
            continue
        real = [o for o in ops if o != identity] or ops
        picks.append(int(real[int(rng.integers(len(real)))]))
    if identity is not None:
        open_layers = [
            i for i, ops in enumerate(space.operations) if i != layer and identity in ops
        ]
        count = int(rng.integers(len(open_layers) + 1))
        for i in rng.choice(open_layers, size=count, replace=False) if count else []:
            picks[int(i)] = identity
    others = [int(rng.integers(n)) for n in space.other_choices]
    return tuple(picks) + tuple(others)


def lowest(
    scores: dict[Operator, float], space: ShrunkSpace, count: int
) -> list[tuple[Operator, float]]:
    """The `count` operators to drop: by increasing score (the smallest angle first), each only
    while another operator of its layer comes later in that order, so every layer keeps one
    (official shrinking.py drop_ops)."""
    order = sorted(scores, key=lambda op: (scores[op], op))
    dropped: list[tuple[Operator, float]] = []
    for k, (layer, choice) in enumerate(order):
        if len(dropped) == count:
            break
        if any(other[0] == layer for other in order[k + 1 :]):
            dropped.append(((layer, choice), scores[(layer, choice)]))
    return dropped
