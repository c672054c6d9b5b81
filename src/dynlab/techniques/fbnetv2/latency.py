"""The latency table of an FBNetV2 (DMaskingNAS) space on this device, and the search's
differentiable expected latency over it (FBNet, Sec. 3.2: the latency of a sampled network is the
sum of its ops' table entries, its expectation under the Gumbel weights the architecture loss's
cost; FBNetV2 Sec. 3.3 keeps FBNet's loss).

A child is the (bilinear) resize to its resolution with the stem (and the fixed first block),
then per searched block either the inverted-residual op, [pw 1x1] (absent when hidden == input),
dw kxk, [SE], pwl 1x1, [the residual add] (when in == out at stride 1), or the skip, [a 1x1
projection] (absent when in == out); then the head conv and the pooled head; each in its deploy
form (BatchNorm folded), each with the block's activation. An op depends on at most two width
choices, which are independent (input and hidden width, hidden and output, input and output), and
the block's activation, kernel, SE and op choices, so one entry per (resolution, option, option)
and the product of the choices' weights give the exact expected sum under independent choices, at
one-hot weights the sum over the child's ops; the table's calibration scales every sum alike
(`dynlab.search.latency_table`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dynlab.backbones.fbnetv2 import CHOICE_KEYS, FBNetV2Supernet
from dynlab.backbones.fbnetv2.layers import ConvBNAct, FBNetHead, IRBlock, SqueezeExcite
from dynlab.backbones.fbnetv2.net import resize
from dynlab.protocol import StaticExits
from dynlab.search.latency_table import (
    REFERENCE_SEED,
    REFERENCES,
    LatencyTable,
    Reference,
    TimingConfig,
    cached_table,
    deploy_op,
    op_key,
)

__all__ = ["FBNetV2Latency"]


class FBNetV2Latency:
    """Predicted milliseconds (batch 1) of the architectures of one FBNetV2 space at one input
    size: `expected(weights)` differentiable in the choice weights, `ms(choices)` for one
    architecture, `span()` the space's extremes."""

    def __init__(self, table: LatencyTable, keys: dict[str, Any], options: dict[str, Any]):
        self.table, self.keys, self.options = table, keys, options
        self._tensors: dict[str, Any] = {}

    @classmethod
    def build(
        cls, net: FBNetV2Supernet, input_size: tuple[int, int, int], timing: TimingConfig
    ) -> FBNetV2Latency:
        """The table of `net`'s space at `input_size`, from the cache or timed now."""
        ops, keys, options = _ops(net, input_size)
        space = {"fbnetv2": net.signature(), "input_size": list(input_size)}
        deployed = lambda: {k: (_deployed(make()), size) for k, (make, size) in ops.items()}  # noqa: E731
        latency = cls(LatencyTable({}), keys, options)  # its keys first: references need them

        def references() -> list[Reference]:
            rng = np.random.default_rng(REFERENCE_SEED)
            counts = net._option_counts()
            picks = [
                {k: [int(rng.integers(n)) for n in counts[k]] for k in CHOICE_KEYS}
                for _ in range(REFERENCES)
            ]
            picks = [{**c, "resolution": c["resolution"][0]} for c in picks]
            return [
                (StaticExits(net.standalone(c).eval()).deploy(), input_size, latency.op_keys(c))
                for c in picks
            ]

        latency.table = cached_table("fbnetv2", space, deployed, timing, references)
        return latency

    # --- one architecture ---------------------------------------------------------------------
    def ms(self, choices: Mapping[str, Any]) -> float:
        """Predicted milliseconds of the architecture `choices` (option indices, as a search
        result holds): the calibrated sum over its ops."""
        return self.table.predict(self.op_keys(choices))

    def op_keys(self, choices: Mapping[str, Any]) -> list[str]:
        """The table keys of the ops of the architecture `choices`."""
        r, k, widths = choices["resolution"], self.keys, choices["widths"]
        chosen = [k["stem"][r][choices["stem"][0]], k["head"][r][widths[-1]][choices["head"][0]]]
        i = choices["stem"][0] if k["stem_in"] else 0
        for j, block in enumerate(k["blocks"]):
            o = widths[j]
            if self.options["ops"][j][choices["ops"][j]] == "skip":
                keys = [block["proj"][r][i][o]]
            else:
                m, a = choices["expansions"][j], choices["acts"][j]
                keys = [block["pw"][r][a][i][m], block["dw"][r][m][choices["kernels"][j]][a]]
                keys += [block["pwl"][r][m][o], block["add"][r][i][o]]
                if self.options["se"][choices["se"][j]]:
                    keys.append(block["se"][r][m][a])
            chosen += [key for key in keys if key is not None]
            i = o
        return chosen

    def span(self) -> tuple[float, float]:
        """The fastest and the slowest architecture's predicted milliseconds, exactly: for a
        resolution, a block's op, hidden width, kernel, SE and activation are free given the
        widths around it, and the widths form a chain (each block costs by the width it gets and
        the one it gives), so a min-plus (max-plus) pass over the blocks finds the extremes."""
        with torch.no_grad():
            t = self._tensors_on(torch.device("cpu"))
            ends = [
                self._extreme(t, r, pick)
                for pick in (torch.amin, torch.amax)
                for r in range(self.options["resolutions"])
            ]
        n = self.options["resolutions"]
        return min(ends[:n]), max(ends[n:])

    def _extreme(self, t: dict[str, Any], r: int, pick: Any) -> float:
        """The cheapest (`pick` amin) or dearest (amax) architecture at resolution `r`."""
        se_options = [float(on) for on in self.options["se"]]
        best = t["stem"][r]  # over the options of the width the next block gets
        if not self.keys["stem_in"]:
            best = pick(best, 0, keepdim=True)
        for b in t["blocks"]:
            se = pick(torch.stack([b["se"][r] * on for on in se_options]), 0)  # [M, A]
            inner = (pick(b["dw"][r], 1) + se).T  # [A, M]
            cost = b["pw"][r][..., None] + inner[:, None, :, None] + b["pwl"][r][None, None]
            cost = pick(pick(cost, 2), 0) + b["add"][r]  # [I, O]
            if b["proj"] is not None:
                cost = pick(torch.stack([cost, b["proj"][r]]), 0)
            best = pick(best[:, None] + cost, 0)
        end = pick(best[:, None] + t["head"][r], 0)
        return float(self.table.calibrate(pick(end, 0)))

    # --- the search's expected latency --------------------------------------------------------
    def expected(self, weights: Mapping[str, Any]) -> Tensor:
        """Expected milliseconds under the choice weights `weights` (the supernet's
        `last_weights()` or `softmax_weights()`), float64, differentiable in them: per op the
        product of its choices' weights times its table entries; exact for independent choices,
        and at one-hot weights `ms` of that architecture."""
        g_r = weights["resolution"].double()
        t = self._tensors_on(g_r.device)
        g_in = weights["stem"][0].double()
        total = torch.einsum("r,rs,s->", g_r, t["stem"], g_in)
        if not self.keys["stem_in"]:
            g_in = g_in.new_ones(1)
        for j, b in enumerate(t["blocks"]):
            g_o = weights["widths"][j].double()
            g_m = weights["expansions"][j].double()
            g_k = weights["kernels"][j].double()
            g_a = weights["acts"][j].double()
            g_se = weights["se"][j].double() @ t["se_on"]
            g_op = weights["ops"][j].double()
            ir = torch.einsum("r,a,i,m,raim->", g_r, g_a, g_in, g_m, b["pw"])
            ir = ir + torch.einsum("r,m,k,a,rmka->", g_r, g_m, g_k, g_a, b["dw"])
            ir = ir + g_se * torch.einsum("r,m,a,rma->", g_r, g_m, g_a, b["se"])
            ir = ir + torch.einsum("r,m,o,rmo->", g_r, g_m, g_o, b["pwl"])
            ir = ir + torch.einsum("r,i,o,rio->", g_r, g_in, g_o, b["add"])
            total = total + g_op[0] * ir
            if b["proj"] is not None:
                total = total + g_op[1] * torch.einsum("r,i,o,rio->", g_r, g_in, g_o, b["proj"])
            g_in = g_o
        head = torch.einsum("r,o,h,roh->", g_r, g_in, weights["head"][0].double(), t["head"])
        return self.table.calibrate(total + head)

    def _tensors_on(self, device: torch.device) -> dict[str, Any]:
        """The table's means arranged as the keys are (0 where an op is absent), as float64
        tensors on `device` (once)."""
        if str(device) not in self._tensors:
            entries = self.table.entries
            mean = lambda keys: torch.tensor(  # noqa: E731
                _map(keys, lambda key: 0.0 if key is None else entries[key]["mean"]),
                dtype=torch.float64,
                device=device,
            )
            self._tensors[str(device)] = {
                "stem": mean(self.keys["stem"]),
                "head": mean(self.keys["head"]),
                "se_on": torch.tensor(
                    [float(on) for on in self.options["se"]], dtype=torch.float64, device=device
                ),
                "blocks": [
                    {op: None if block[op] is None else mean(block[op]) for op in _BLOCK_OPS}
                    for block in self.keys["blocks"]
                ],
            }
        return self._tensors[str(device)]


_BLOCK_OPS = ("pw", "dw", "se", "pwl", "add", "proj")


class _Resize(nn.Module):
    """The exported child's input resize to its resolution (bilinear, `FBNetV2Net`)."""

    def __init__(self, resolution: int) -> None:
        super().__init__()
        self.size = (resolution, resolution)

    def forward(self, x: Tensor) -> Tensor:
        return resize(x, self.size, "bilinear")


class _Add(nn.Module):
    """A block's residual add (its other input a fixed map)."""

    def __init__(self, out: tuple[int, int, int]) -> None:
        super().__init__()
        self.register_buffer("skip", torch.zeros(1, *out))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.skip


class _Pooled(nn.Module):
    """The head conv, then the pooled head (FBNetHead)."""

    def __init__(self, conv: nn.Module, head: FBNetHead) -> None:
        super().__init__()
        self.conv, self.head = conv, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x))


def _deployed(op: nn.Module) -> nn.Module:
    """`deploy_op` on each folded part (the resize and the add stay as they are: torch.fx need
    not trace the resize)."""
    if isinstance(op, nn.Sequential) and isinstance(op[0], _Resize):
        return nn.Sequential(op[0], deploy_op(op[1]))
    if isinstance(op, _Add):
        return op
    return deploy_op(op)


def _ops(
    net: FBNetV2Supernet, input_size: tuple[int, int, int]
) -> tuple[
    dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]], dict[str, Any], dict[str, Any]
]:
    """Every op of the space keyed by kind and shapes, as a builder of its training form (called
    only when a table is timed, not on a cache hit) with its input size; the key of each
    (resolution, option, option) of each op (None where the child has no op); the options."""
    c, ops = net.config, {}

    def add(
        kind: str, make: Callable[[], nn.Module], size: tuple[int, ...], out: tuple[int, ...]
    ) -> str:
        key = op_key(kind, size, out)
        ops.setdefault(key, (make, size))
        return key

    def stem(r: int, width: int) -> nn.Module:
        parts = [ConvBNAct(net.in_chans, width, 3, c["stem_stride"], act="hswish")]
        if net.first_spec is not None:
            parts.append(IRBlock(net.first_spec))
        return nn.Sequential(_Resize(r), nn.Sequential(*parts))

    def pooled(width: int, head_width: int) -> nn.Module:
        conv = ConvBNAct(width, net.head_pre, 1, act="hswish")
        return _Pooled(conv, FBNetHead(net.head_pre, head_width, net.num_classes, 0.0))

    stems, heads = [], []
    for r, sz in zip(net.resolutions, net._sizes, strict=True):
        stem_out = lambda s, hw=sz["stem_out"]: (net.input_widths[0] if net.first else s, *hw)  # noqa: E731
        stems.append(
            [
                add(f"stem-res:{r}", partial(stem, r, s), input_size, stem_out(s))
                for s in net.stem_widths
            ]
        )
        final = (net.num_classes, 1, 1)
        heads.append(
            [
                [
                    add("head", partial(pooled, w, h), (w, *sz["final"]), final)
                    for h in net.head_widths
                ]
                for w in net.search_blocks[-1].outs
            ]
        )
    blocks = [_block_keys(net, j, add) for j in range(len(net.search_blocks))]
    options = {
        "resolutions": len(net.resolutions),
        "ops": [b.ops for b in net.search_blocks],
        "se": list(net.se_options),
    }
    keys = {"stem": stems, "head": heads, "blocks": blocks, "stem_in": net.first is None}
    return ops, keys, options


def _block_keys(net: FBNetV2Supernet, j: int, add: Callable[..., str]) -> dict[str, Any]:
    """The keys of block `j`'s ops, [resolution] then its options (see `_ops`)."""
    b = net.search_blocks[j]
    keys: dict[str, Any] = {op: [] for op in _BLOCK_OPS}
    for sz in net._sizes:
        (hi, wi), (ho, wo) = sz["in"][j], sz["out"][j]
        keys["pw"].append(
            [
                [
                    [
                        None
                        if i == m
                        else add(
                            f"pw-{a}", partial(ConvBNAct, i, m, act=a), (i, hi, wi), (m, hi, wi)
                        )
                        for m in b.mids
                    ]
                    for i in b.ins
                ]
                for a in b.acts
            ]
        )
        keys["dw"].append(
            [
                [
                    [
                        add(
                            f"dw{k}-stride:{b.stride}-{a}",
                            partial(ConvBNAct, m, m, k, b.stride, groups=m, act=a),
                            (m, hi, wi),
                            (m, ho, wo),
                        )
                        for a in b.acts
                    ]
                    for k in net.kernels
                ]
                for m in b.mids
            ]
        )
        keys["se"].append(
            [
                [
                    add(f"se:{s}-{a}", partial(SqueezeExcite, m, s, a), (m, ho, wo), (m, ho, wo))
                    for a in b.acts
                ]
                for m, s in zip(b.mids, b.se_mids, strict=True)
            ]
        )
        keys["pwl"].append(
            [
                [add("pwl", partial(ConvBNAct, m, o), (m, ho, wo), (o, ho, wo)) for o in b.outs]
                for m in b.mids
            ]
        )
        keys["add"].append(
            [
                [
                    add("add", partial(_Add, (o, ho, wo)), (o, ho, wo), (o, ho, wo))
                    if i == o and b.stride == 1
                    else None
                    for o in b.outs
                ]
                for i in b.ins
            ]
        )
        if "skip" in b.ops:
            keys["proj"].append(
                [
                    [
                        None
                        if i == o
                        else add(
                            "skip", partial(ConvBNAct, i, o, act="relu"), (i, hi, wi), (o, ho, wo)
                        )
                        for o in b.outs
                    ]
                    for i in b.ins
                ]
            )
    if "skip" not in b.ops:
        keys["proj"] = None
    return keys


def _map(nested: Any, fn: Any) -> Any:
    """`fn` on every leaf (a key or None) of nested lists."""
    return [_map(x, fn) for x in nested] if isinstance(nested, list) else fn(nested)
