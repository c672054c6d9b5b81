"""The latency table of an SPOS space on this device (`dynlab.search.latency_table`): the stem,
every choice block of every layer (at every mid width with channel search) at the input shape the
layer meets, and the last conv with the head, each in its deploy form (BatchNorm folded into the
convs, as in the standalone net's `StaticExits.deploy`) and timed at batch 1. A candidate's
predicted milliseconds are the sum over its ops, as its MACs are the sum in `MacsTable`."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

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
from dynlab.nn.reparam import fold_and_merge
from dynlab.search.latency_table import LatencyTable, Op, TimingConfig, cached_table

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
        deployed = lambda: {k: (_deploy(m), size) for k, (m, size) in ops.items()}  # noqa: E731
        return cls(cached_table("spos", space, deployed, timing), keys, fixed)

    def ms(self, genes: Sequence[int], space: Any) -> float:
        """Predicted milliseconds (batch 1) of candidate `genes` of `space` (a `SearchSpace`)."""
        arch, scales = space.split(genes)
        chosen = [self.keys[i][b][scales[i] if scales else 0] for i, b in enumerate(arch)]
        return self.table.predict([*self.fixed, *chosen])

    def device(self) -> dict[str, object]:
        """What the table was timed on (CPU, threads, torch), for a search's identity."""
        d = self.table.device
        return {
            "cpu": d.get("cpu"),
            "threads": d.get("timing", {}).get("threads"),
            "torch": d.get("torch"),
        }

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
        fixed = self.table.predict(self.fixed)
        mean = self.table.entries
        low = sum(min(mean[k]["mean"] for blocks in layer for k in blocks) for layer in self.keys)
        high = sum(max(mean[k]["mean"] for blocks in layer for k in blocks) for layer in self.keys)
        return fixed + low, fixed + high


def _deploy(module: nn.Module) -> nn.Module:
    """An op as the net's deploy form runs it, BatchNorm folded into its convs. Held in a
    container, as in the net: torch.fx cannot trace a ChoiceBlock as the root of a trace, but
    traces it inside one."""
    deployed = nn.Sequential(copy.deepcopy(module)).eval()
    fold_and_merge(deployed)
    return deployed


def _ops(
    config: Mapping[str, Any], input_size: tuple[int, int, int]
) -> tuple[dict[str, Op], list[list[list[str]]], list[str]]:
    """Every op of the space keyed by kind and shapes (in training form: `_deploy` folds it when a
    table is timed), the key of each (layer, block, scale), and the keys of the fixed ops (stem;
    last conv with the head)."""
    frame = SPOSNet(arch=(0,) * sum(config["stage_repeats"]), **config).eval()
    ops: dict[str, Op] = {}

    def add(kind: str, module: nn.Module, size: tuple[int, int, int], out: torch.Tensor) -> str:
        key = f"{kind}-input:{size[1]}x{size[2]}x{size[0]}-output:" + "x".join(
            str(d) for d in (*out.shape[2:], out.shape[1])
        )
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
