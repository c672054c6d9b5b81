"""The latency table of an SPOS space on this device (`dynlab.search.latency_table`): the stem,
every choice block of every layer (at every mid width with channel search) at the input shape the
layer meets, and the last conv with the head, each in its deploy form (BatchNorm folded into the
convs, as in the standalone net's `StaticExits.deploy`) and timed at batch 1. A candidate's
predicted milliseconds are the sum over its ops, as its MACs are the sum in `MacsTable`, scaled by
the table's calibration on whole networks (`dynlab.search.latency_table`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from dynlab.backbones.spos_shufflenetv2 import (
    BLOCKS,
    CHANNEL_SCALES,
    ChoiceBlock,
    SPOSNet,
    SPOSSupernet,
    mid_channels,
)
from dynlab.protocol import StaticExits
from dynlab.search.latency_table import (
    REFERENCE_SEED,
    REFERENCES,
    LatencyTable,
    Op,
    Reference,
    TimingConfig,
    cached_table,
    deploy_op,
    op_key,
)

__all__ = ["SPOSLatency"]


class SPOSLatency:
    """Predicted milliseconds of the candidates of one SPOS space at one input size."""

    def __init__(
        self, table: LatencyTable, keys: Sequence[Sequence[Sequence[str]]], fixed: list[str]
    ):
        self.table, self.keys, self.fixed = table, keys, fixed

    @classmethod
    def build(
        cls, supernet: SPOSSupernet, input_size: tuple[int, int, int], timing: TimingConfig
    ) -> SPOSLatency:
        """The table of `supernet`'s space at `input_size`, from the cache or timed now."""
        ops, keys, fixed = _ops(supernet.config, input_size)
        space = {"spos": supernet.signature(), "input_size": list(input_size)}
        deployed = lambda: {k: (deploy_op(m), size) for k, (m, size) in ops.items()}  # noqa: E731
        latency = cls(LatencyTable({}), keys, fixed)  # its keys first: references need them

        def references() -> list[Reference]:
            rng = np.random.default_rng(REFERENCE_SEED)
            choices = supernet.space.gene_choices()
            genes = [tuple(int(g) for g in rng.integers(0, choices)) for _ in range(REFERENCES)]
            return [
                (
                    StaticExits(supernet.child(g).eval()).deploy(),
                    input_size,
                    latency.op_keys(g, supernet.space),
                )
                for g in genes
            ]

        latency.table = cached_table("spos", space, deployed, timing, references)
        return latency

    def op_keys(self, genes: Sequence[int], space: Any) -> list[str]:
        """The table keys of candidate `genes`' ops (`space` a `SearchSpace`)."""
        arch, scales = space.split(genes)
        chosen = [self.keys[i][b][scales[i] if scales else 0] for i, b in enumerate(arch)]
        return [*self.fixed, *chosen]

    def ms(self, genes: Sequence[int], space: Any) -> float:
        """Predicted milliseconds (batch 1) of candidate `genes` of `space` (a `SearchSpace`)."""
        return self.table.predict(self.op_keys(genes, space))

    def window_problem(self, low: float | None, high: float | None) -> str | None:
        """One line when the time window [low, high] ms holds no candidate of the space (by the
        table's span), else None."""
        fastest, slowest = self.span()
        if (low is not None and low > slowest) or (high is not None and high < fastest):
            return (
                f"spos evolution: the time window [min_latency_ms={low}, max_latency_ms={high}] "
                f"holds no architecture: on this machine the space's predicted latency spans "
                f"{fastest:.3f} to {slowest:.3f} ms per image"
            )
        return None

    def span(self) -> tuple[float, float]:
        """The fastest and the slowest candidate's predicted milliseconds."""
        fixed = self.table.ops_ms(self.fixed)
        mean = self.table.entries
        low = sum(min(mean[k]["mean"] for blocks in layer for k in blocks) for layer in self.keys)
        high = sum(max(mean[k]["mean"] for blocks in layer for k in blocks) for layer in self.keys)
        return self.table.calibrate(fixed + low), self.table.calibrate(fixed + high)


def _ops(
    config: Mapping[str, Any], input_size: tuple[int, int, int]
) -> tuple[dict[str, Op], list[list[list[str]]], list[str]]:
    """Every op of the space keyed by kind and shapes (in training form: `deploy_op` folds it when a
    table is timed), the key of each (layer, block, scale), and the keys of the fixed ops (stem;
    last conv with the head)."""
    frame = SPOSNet(arch=(0,) * sum(config["stage_repeats"]), **config).eval()
    ops: dict[str, Op] = {}

    def add(kind: str, module: nn.Module, size: tuple[int, int, int], out: torch.Tensor) -> str:
        key = op_key(kind, size, tuple(out.shape[1:]))
        ops.setdefault(key, (module, size))
        return key

    with torch.no_grad():
        x = torch.zeros(1, *input_size)
        fixed = [add("stem", frame.stem, input_size, y := frame.stem(x))]
        x, keys = y, []
        for spec in frame.specs:
            size = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
            scales = range(len(CHANNEL_SCALES)) if frame.space.num_scales else [None]
            layer = []
            for b, name in enumerate(BLOCKS):
                row = []
                for s in scales:
                    mid = mid_channels(spec.base_mid, s)
                    block = ChoiceBlock(b, spec, mid, affine=True)
                    kind = f"{name}-mid:{mid}-stride:{spec.stride}"
                    row.append(add(kind, block, size, block.eval()(x)))
                layer.append(row)
            keys.append(layer)
            x = ChoiceBlock(0, spec, spec.base_mid, affine=True).eval()(x)
        size = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
        final = nn.Sequential(frame.conv_last, frame.head)
        fixed.append(add("last_conv_head", final, size, final(x)[:, :, None, None]))
    return ops, keys, fixed
