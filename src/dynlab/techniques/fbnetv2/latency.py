"""The latency table of an FBNetV2 (DMaskingNAS) space on this device, and the search's
differentiable expected latency over it (FBNet, Sec. 3.2: the latency of a sampled network is the
sum of its ops' table entries, its expectation under the Gumbel weights the architecture loss's
cost; FBNetV2 Sec. 3.3 keeps FBNet's loss).

A child is the resize to its resolution with the stem (and the fixed first block), then per
searched block pw 1x1, dw kxk, [SE], pwl 1x1 (+ the residual), then the head conv and the pooled
head, each in its deploy form (BatchNorm folded). An op of a block depends on at most two width
choices that are independent (the block's input and hidden widths, its hidden and output widths),
so one entry per (resolution, width, width) and the product of the choices' weights give the
exact expected sum under independent choices, at one-hot weights the sum over the child's ops;
the table's calibration scales every sum alike (`dynlab.search.latency_table`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dynlab.backbones.fbnetv2 import CHOICE_KEYS, FBNetV2Supernet
from dynlab.backbones.fbnetv2.layers import ConvBNAct, FBNetHead, IRBlock, SqueezeExcite
from dynlab.nn.dmasking import subsample_nearest
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
        r, k = choices["resolution"], self.keys
        chosen = [k["fixed"][r], k["head"][r][choices["widths"][-1]]]
        for j, block in enumerate(k["blocks"]):
            i = choices["widths"][block["in_stage"]] if block["in_stage"] is not None else 0
            m, o = choices["expansions"][j], choices["widths"][block["stage"]]
            chosen += [block["pw"][r][i][m], block["dw"][r][m][choices["kernels"][j]]]
            chosen.append(block["pwl"][r][m][o])
            if self.options["se"][choices["se"][j]]:
                chosen.append(block["se"][r][m])
        return chosen

    def span(self) -> tuple[float, float]:
        """The fastest and the slowest architecture's predicted milliseconds, exactly: for a
        resolution and the widths around it, a block's expansion, kernel and SE are free, and the
        stages' widths form a chain (each block costs by the width it gets and the one it gives),
        so a min-plus (max-plus) pass over the blocks finds the extremes."""
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
        best = t["fixed"][r].reshape(1)  # over the options of the width the next block gets
        for block, b in zip(self.keys["blocks"], t["blocks"], strict=True):
            se = pick(torch.stack([b["se"][r] * on for on in se_options]), 0)  # [M]
            inner = pick(b["dw"][r], -1) + se  # [M]
            cost = b["pw"][r][:, :, None] + inner[None, :, None] + b["pwl"][r][None]  # [I, M, O]
            cost = pick(cost, 1)  # [I, O]
            if block["in_stage"] == block["stage"]:  # a residual block: in and out one width
                best = best + torch.diagonal(cost)
            else:
                best = pick(best[:, None] + cost, 0)
        return float(self.table.calibrate(pick(best + t["head"][r], 0)))

    # --- the search's expected latency --------------------------------------------------------
    def expected(self, weights: Mapping[str, Any]) -> Tensor:
        """Expected milliseconds under the choice weights `weights` (the supernet's
        `last_weights()` or `softmax_weights()`), float64, differentiable in them: per op the
        product of its choices' weights times its table entries; exact for independent choices,
        and at one-hot weights `ms` of that architecture."""
        g_r = weights["resolution"].double()
        t = self._tensors_on(g_r.device)
        widths = [w.double() for w in weights["widths"]]
        total = t["fixed"] @ g_r + torch.einsum("r,ro,o->", g_r, t["head"], widths[-1])
        for j, block in enumerate(self.keys["blocks"]):
            b = t["blocks"][j]
            g_in = widths[block["in_stage"]] if block["in_stage"] is not None else g_r.new_ones(1)
            g_m = weights["expansions"][j].double()
            g_k = weights["kernels"][j].double()
            g_se = weights["se"][j].double() @ t["se_on"]
            g_out = widths[block["stage"]]
            total = total + torch.einsum("r,i,m,rim->", g_r, g_in, g_m, b["pw"])
            total = total + torch.einsum("r,m,k,rmk->", g_r, g_m, g_k, b["dw"])
            total = total + g_se * torch.einsum("r,m,rm->", g_r, g_m, b["se"])
            total = total + torch.einsum("r,m,o,rmo->", g_r, g_m, g_out, b["pwl"])
        return self.table.calibrate(total)

    def _tensors_on(self, device: torch.device) -> dict[str, Any]:
        """The table's means arranged as the keys are, as float64 tensors on `device` (once)."""
        if str(device) not in self._tensors:
            mean = lambda keys: torch.tensor(  # noqa: E731
                _map(keys, lambda key: self.table.entries[key]["mean"]),
                dtype=torch.float64,
                device=device,
            )
            self._tensors[str(device)] = {
                "fixed": mean(self.keys["fixed"]),
                "head": mean(self.keys["head"]),
                "se_on": torch.tensor(
                    [float(on) for on in self.options["se"]], dtype=torch.float64, device=device
                ),
                "blocks": [
                    {op: mean(block[op]) for op in ("pw", "dw", "se", "pwl")}
                    for block in self.keys["blocks"]
                ],
            }
        return self._tensors[str(device)]


class _Resize(nn.Module):
    """The child's input resize to its resolution (nearest, `FBNetV2Net.forward_features`)."""

    def __init__(self, resolution: int) -> None:
        super().__init__()
        self.size = (resolution, resolution)

    def forward(self, x: Tensor) -> Tensor:
        return subsample_nearest(x, self.size)


class _Residual(nn.Module):
    """A block's pwl with the residual add after it (the add's other input a fixed map)."""

    def __init__(self, pwl: nn.Module, out: tuple[int, int, int]) -> None:
        super().__init__()
        self.pwl = pwl
        self.register_buffer("skip", torch.zeros(1, *out))

    def forward(self, x: Tensor) -> Tensor:
        return self.pwl(x) + self.skip


class _Pooled(nn.Module):
    """The head conv, then the pooled head (FBNetHead)."""

    def __init__(self, conv: nn.Module, head: FBNetHead) -> None:
        super().__init__()
        self.conv, self.head = conv, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x))


def _deployed(op: nn.Module) -> nn.Module:
    """`deploy_op` on each folded part (the resize and the residual's buffer stay as they are:
    torch.fx need not trace subsample_nearest)."""
    if isinstance(op, nn.Sequential) and isinstance(op[0], _Resize):
        return nn.Sequential(op[0], deploy_op(op[1]))
    if isinstance(op, _Residual):
        return _Residual(deploy_op(op.pwl), tuple(op.skip.shape[1:]))
    return deploy_op(op)


def _ops(
    net: FBNetV2Supernet, input_size: tuple[int, int, int]
) -> tuple[
    dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]], dict[str, Any], dict[str, Any]
]:
    """Every op of the space keyed by kind and shapes, as a builder of its training form (called
    only when a table is timed, not on a cache hit) with its input size; the key of each
    (resolution, option, option) of each op; and the option counts."""
    c, ops = net.config, {}

    def add(
        kind: str, make: Callable[[], nn.Module], size: tuple[int, ...], out: tuple[int, ...]
    ) -> str:
        key = op_key(kind, size, out)
        ops.setdefault(key, (make, size))
        return key

    def stem(r: int) -> nn.Module:
        parts = [ConvBNAct(net.in_chans, c["stem_width"], 3, c["stem_stride"], act="hswish")]
        if net.first_spec is not None:
            parts.append(IRBlock(net.first_spec))
        return nn.Sequential(_Resize(r), nn.Sequential(*parts))

    def pooled(width: int) -> nn.Module:
        conv = ConvBNAct(width, net.head_pre, 1, act="hswish")
        return _Pooled(conv, FBNetHead(net.head_pre, c["head_width"], net.num_classes, 0.0))

    def pwl(m: int, o: int, out: tuple[int, int, int], residual: bool) -> nn.Module:
        return _Residual(ConvBNAct(m, o), out) if residual else ConvBNAct(m, o)

    fixed, head = [], []
    for r, sz in zip(net.resolutions, net._sizes, strict=True):
        stem_out = (net.base_width, *sz["stem_out"])
        fixed.append(add(f"stem-res:{r}", partial(stem, r), input_size, stem_out))
        head.append(
            [
                add("head", partial(pooled, w), (w, *sz["final"]), (net.num_classes, 1, 1))
                for w in net.stage_widths[-1]
            ]
        )
    blocks = []
    for j, b in enumerate(net.search_blocks):
        in_stage = None if j == 0 else net.search_blocks[j - 1].stage
        ins = [net.base_width] if in_stage is None else list(net.stage_widths[in_stage])
        outs = list(net.stage_widths[b.stage])
        keys: dict[str, Any] = {"stage": b.stage, "in_stage": in_stage}
        keys |= {op: [] for op in ("pw", "dw", "se", "pwl")}
        pwl_kind = "pwl-residual" if b.residual else "pwl"
        for sz in net._sizes:
            (hi, wi), (ho, wo) = sz["in"][j], sz["out"][j]
            keys["pw"].append(
                [
                    [
                        add(
                            f"pw-{b.act}",
                            partial(ConvBNAct, i, m, act=b.act),
                            (i, hi, wi),
                            (m, hi, wi),
                        )
                        for m in b.mids
                    ]
                    for i in ins
                ]
            )
            keys["dw"].append(
                [
                    [
                        add(
                            f"dw{k}-stride:{b.stride}-{b.act}",
                            partial(ConvBNAct, m, m, k, b.stride, groups=m, act=b.act),
                            (m, hi, wi),
                            (m, ho, wo),
                        )
                        for k in net.kernels
                    ]
                    for m in b.mids
                ]
            )
            keys["se"].append(
                [
                    add(
                        f"se:{s}-{b.act}",
                        partial(SqueezeExcite, m, s, b.act),
                        (m, ho, wo),
                        (m, ho, wo),
                    )
                    for m, s in zip(b.mids, b.se_mids, strict=True)
                ]
            )
            keys["pwl"].append(
                [
                    [
                        add(
                            pwl_kind,
                            partial(pwl, m, o, (o, ho, wo), b.residual),
                            (m, ho, wo),
                            (o, ho, wo),
                        )
                        for o in outs
                    ]
                    for m in b.mids
                ]
            )
        blocks.append(keys)
    options = {
        "resolutions": len(net.resolutions),
        "widths": [len(w) for w in net.stage_widths],
        "expansions": len(c["expansions"]),
        "kernels": len(net.kernels),
        "se": list(net.se_options),
    }
    return ops, {"fixed": fixed, "head": head, "blocks": blocks}, options


def _map(nested: Any, fn: Any) -> Any:
    """`fn` on every leaf (a key) of nested lists."""
    return [_map(x, fn) for x in nested] if isinstance(nested, list) else fn(nested)
