"""The DMaskingNAS supernet over an FBNetV2 space: choices, forward, expected cost, children."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dynlab.backbones.fbnetv2.cost import (
    COST_KINDS,
    CostTable,
    head_cost,
    measure,
    out_hw,
    unit_layer,
)
from dynlab.backbones.fbnetv2.layers import (
    BlockSpec,
    ConvBNAct,
    FBNetClassifier,
    FBNetHead,
    IRBlock,
    divisible_width,
    init_weights,
    se_width,
)
from dynlab.backbones.fbnetv2.masked import DMaskBlock, SearchBlock
from dynlab.backbones.fbnetv2.net import FBNetV2Net, json_choices
from dynlab.backbones.fbnetv2.space import CHOICE_KEYS, VARIANTS, space_config
from dynlab.nn.dmasking import (
    ChannelMask,
    gumbel_weights,
    mix_placed,
    one_hot,
    receptive_positions,
    subsample_nearest,
)


class FBNetV2Supernet(FBNetClassifier):
    """The DMaskingNAS supernet: masked widest blocks, Gumbel-softmax choices (train), argmax
    (eval) or fixed one-hot weights; `expected_macs()` / `expected_params()` are the
    differentiable costs of the last forward's weights. Space kwargs override the `space`
    preset (see `space_config`)."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        space: str = "fbnetv2_f",
        stage_widths: Sequence[Sequence[int]] | None = None,
        strides: Sequence[int] | None = None,
        repeats: Sequence[int] | None = None,
        acts: Sequence[str] | None = None,
        expansions: Sequence[float] | None = None,
        kernels: Sequence[int] | None = None,
        se: Sequence[bool] | None = None,
        resolutions: Sequence[int] | None = None,
        stem_width: int | None = None,
        stem_stride: int | None = None,
        first_width: int | None = None,
        head_width: int | None = None,
        tau: float = 1.0,
        hard: bool = False,
    ) -> None:
        super().__init__()
        space_kw = {
            "stage_widths": stage_widths,
            "strides": strides,
            "repeats": repeats,
            "acts": acts,
            "expansions": expansions,
            "kernels": kernels,
            "se": se,
            "resolutions": resolutions,
            "stem_width": stem_width,
            "stem_stride": stem_stride,
            "first_width": first_width,
            "head_width": head_width,
        }
        c = space_config(space, **space_kw)
        if num_classes < 0 or in_chans < 1:
            raise ValueError(
                f"num_classes must be >= 0 and in_chans >= 1, got {num_classes}, {in_chans}"
            )
        self.config: dict[str, Any] = {
            **c,
            "num_classes": int(num_classes),
            "in_chans": int(in_chans),
            "drop_rate": float(drop_rate),
        }
        self.tau, self.hard = float(tau), bool(hard)
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.resolutions: tuple[int, ...] = c["resolutions"]
        self.stage_widths: tuple[tuple[int, ...], ...] = c["stage_widths"]
        self.kernels: tuple[int, ...] = c["kernels"]
        self.se_options: tuple[bool, ...] = c["se"]

        # the fixed layers and the searchable blocks
        self.stem = ConvBNAct(in_chans, c["stem_width"], 3, c["stem_stride"], act="hswish")
        width = c["stem_width"]
        self.first_spec: BlockSpec | None = None
        self.first: IRBlock | None = None
        if c["first_width"]:  # mobile-vision stage 1: `ir_k3_hs` e1, fixed
            mid = divisible_width(width * 1.0)
            self.first_spec = BlockSpec(
                cin=width,
                cout=c["first_width"],
                mid=mid,
                kernel=3,
                act="hswish",
                pw=width != mid,
                residual=width == c["first_width"],
            )
            self.first = IRBlock(self.first_spec)
            width = c["first_width"]
        self.base_width = width
        self.search_blocks: list[SearchBlock] = []
        for s, (widths, stride, repeats, act) in enumerate(
            zip(c["stage_widths"], c["strides"], c["repeats"], c["acts"], strict=True)
        ):
            for j in range(repeats):
                in_max = width if j == 0 else max(widths)
                mids = tuple(divisible_width(in_max * e) for e in c["expansions"])
                se_mids = tuple(se_width(m) for m in mids)
                if max(se_mids) != se_width(max(mids)):
                    raise ValueError(
                        f"block {len(self.search_blocks)}: SE widths {se_mids} not monotone"
                    )
                self.search_blocks.append(
                    SearchBlock(s, in_max, mids, se_mids, stride if j == 0 else 1, j > 0, act)
                )
            width = max(widths)
        self.stages = nn.ModuleList(
            nn.ModuleList(
                DMaskBlock(b, max(self.stage_widths[s]), self.kernels, self.se_options)
                for b in self.search_blocks
                if b.stage == s
            )
            for s in range(len(self.stage_widths))
        )
        self.width_masks = nn.ModuleList(ChannelMask(w) for w in self.stage_widths)
        self.head_pre = divisible_width(width * 6)
        self.head_conv = ConvBNAct(width, self.head_pre, 1, act="hswish")
        self.head = FBNetHead(self.head_pre, c["head_width"], num_classes, drop_rate)
        self.num_features = self.head_pre
        self.head_hidden_size = c["head_width"]
        init_weights(self)

        # architecture logits (uniform at start: argmax picks the first option of each)
        self._alpha_names: dict[str, list[str]] = {k: [] for k in CHOICE_KEYS}

        def alpha(key: str, name: str, n: int) -> None:
            self.register_parameter(name, nn.Parameter(torch.zeros(n)))
            self._alpha_names[key].append(name)

        alpha("resolution", "alpha_resolution", len(self.resolutions))
        for s, widths in enumerate(self.stage_widths):
            alpha("widths", f"alpha_width_{s}", len(widths))
        for i in range(len(self.search_blocks)):
            alpha("expansions", f"alpha_expansion_{i}", len(c["expansions"]))
            alpha("kernels", f"alpha_kernel_{i}", len(self.kernels))
            alpha("se", f"alpha_se_{i}", len(self.se_options))

        self._geometry()
        self._fixed: dict[str, Any] | None = None
        self._last: dict[str, Any] | None = None
        self._costs: dict[str, CostTable] = {}
        self._cost_cache: dict[tuple[str, str], dict[str, Tensor]] = {}

    # --- geometry: sizes per resolution option, placement on the full grid -------------------
    def _geometry(self) -> None:
        """Per resolution option: every layer's input size (meta runs of unit convs), the output
        map size and its placement on the largest option's grid (ValueError when it cannot)."""
        c = self.config
        total_stride = c["stem_stride"] * math.prod(b.stride for b in self.search_blocks)
        self._sizes: list[dict[str, Any]] = []
        for r in self.resolutions:
            stem_out = out_hw(3, c["stem_stride"], r, r)
            hw, block_in, block_out = stem_out, [], []
            for b in self.search_blocks:
                block_in.append(hw)
                hw = out_hw(max(self.kernels), b.stride, *hw)
                block_out.append(hw)
            self._sizes.append(
                {
                    "input": (r, r),
                    "stem_out": stem_out,
                    "in": block_in,
                    "out": block_out,
                    "final": hw,
                }
            )
        full = max(range(len(self.resolutions)), key=lambda i: self.resolutions[i])
        self.full_index = full
        self.grid: tuple[int, int] = self._sizes[full]["final"]
        self.positions: list[tuple[list[int], list[int]]] = []
        for r, sizes in zip(self.resolutions, self._sizes, strict=True):
            h, w = sizes["final"]
            R = self.resolutions[full]
            rows = receptive_positions(h, r, R, total_stride)
            cols = receptive_positions(w, r, R, total_stride)
            if rows[-1] >= self.grid[0] or cols[-1] >= self.grid[1] or len(set(rows)) != len(rows):
                raise ValueError(
                    f"resolution option {r}: its {h}x{w} output map does not fit the {self.grid[0]}x"
                    f"{self.grid[1]} map of option {R} pixel for pixel; use options whose ratio to "
                    f"{R} keeps maps of at most one pixel per grid cell, e.g. multiples of the total "
                    f"stride {total_stride}"
                )
            self.positions.append((rows, cols))

    # --- choices ------------------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        """Every choice's logits (named alpha_*), resolution first."""
        return [getattr(self, n) for k in CHOICE_KEYS for n in self._alpha_names[k]]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an architecture logit."""
        alphas = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in alphas]

    def _alphas(self, key: str) -> list[Tensor]:
        return [getattr(self, n) for n in self._alpha_names[key]]

    def active(self) -> dict[str, Any]:
        """The architecture `forward` runs in eval mode (the argmax, or the fixed choices), what
        `child` of it cuts out."""
        return self.fixed if self.fixed is not None else self.choices()

    def choices(self) -> dict[str, Any]:
        """The argmax of every logit group (indices into the options), JSON-able (one sync)."""
        alphas = self.arch_parameters()
        flat = torch.stack([t.detach().argmax() for t in alphas]).tolist()
        out: dict[str, Any] = {}
        for k in CHOICE_KEYS:
            n = len(self._alpha_names[k])
            out[k], flat = (flat[0] if k == "resolution" else flat[:n]), flat[n:]
        return out

    def _option_counts(self) -> dict[str, list[int]]:
        return {k: [t.numel() for t in self._alphas(k)] for k in CHOICE_KEYS}

    def choice_problem(self, choices: Any) -> str | None:
        """What is wrong with `choices` (one line), or None when it is a choice of this space."""
        if not isinstance(choices, Mapping) or set(choices) != set(CHOICE_KEYS):
            got = sorted(choices) if isinstance(choices, Mapping) else type(choices).__name__
            return f"choices must be a mapping with keys {list(CHOICE_KEYS)}, got {got}"
        counts = self._option_counts()
        for key in CHOICE_KEYS:
            value = choices[key]
            values = [value] if key == "resolution" else value
            if key != "resolution" and (
                isinstance(value, (str, bytes)) or not isinstance(value, Sequence)
            ):
                return (
                    f"choices[{key!r}] must be a list of {len(counts[key])} indices, got {value!r}"
                )
            if len(values) != len(counts[key]):
                return (
                    f"choices[{key!r}] has {len(values)} entries, the space has {len(counts[key])}"
                )
            for i, (v, n) in enumerate(zip(values, counts[key], strict=True)):
                if isinstance(v, bool) or not hasattr(v, "__index__") or not 0 <= int(v) < n:
                    where = key if key == "resolution" else f"{key}[{i}]"
                    return f"choices {where} is {v!r}, expected an int in 0..{n - 1}"
        return None

    def _checked(self, choices: Mapping[str, Any]) -> dict[str, Any]:
        problem = self.choice_problem(choices)
        if problem:
            raise ValueError(f"FBNetV2 supernet: {problem}")
        return json_choices(choices)

    def decode(self, choices: Mapping[str, Any]) -> dict[str, Any]:
        """The option values of `choices`: resolution, stage widths, hidden widths, kernels, SE."""
        c = self._checked(choices)
        return {
            "resolution": self.resolutions[c["resolution"]],
            "widths": [w[i] for w, i in zip(self.stage_widths, c["widths"], strict=True)],
            "mids": [b.mids[i] for b, i in zip(self.search_blocks, c["expansions"], strict=True)],
            "kernels": [self.kernels[i] for i in c["kernels"]],
            "se": [self.se_options[i] for i in c["se"]],
        }

    def fix(self, choices: Mapping[str, Any]) -> None:
        """Force one-hot weights at `choices` (train and eval) until `unfix()`; the expected
        costs then read them until the next forward."""
        self._fixed = self._checked(choices)
        self._last = None

    def unfix(self) -> None:
        """Back to Gumbel samples (train) / argmax (eval) from the next forward."""
        self._fixed = None
        self._last = None

    @property
    def fixed(self) -> dict[str, Any] | None:
        """The choices `fix` forced, or None."""
        return None if self._fixed is None else dict(self._fixed)

    def _draw(self) -> tuple[dict[str, Any], int | None]:
        """Weights for one forward, and the resolution index when they are constant one-hot."""
        if self._fixed is not None or not self.training:
            c = self._fixed if self._fixed is not None else self.choices()
            ref = self.alpha_resolution
            w: dict[str, Any] = {"resolution": one_hot(c["resolution"], ref.numel(), ref)}
            for k in CHOICE_KEYS[1:]:
                w[k] = [
                    one_hot(i, t.numel(), t) for i, t in zip(c[k], self._alphas(k), strict=True)
                ]
            return w, c["resolution"]
        sample = lambda t: gumbel_weights(t, self.tau, self.hard)  # noqa: E731
        w = {"resolution": sample(self.alpha_resolution)}
        for k in CHOICE_KEYS[1:]:
            w[k] = [sample(t) for t in self._alphas(k)]
        return w, None

    def last_weights(self) -> dict[str, Any]:
        """The choice weights of the last forward (what the expected costs use)."""
        if self._last is None:
            self._last, _ = self._draw()
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._last.items()}

    # --- forward ------------------------------------------------------------------------------
    def _body(self, x: Tensor, w: Mapping[str, Any]) -> Tensor:
        """Stem .. last stage .. the head's pre-pool conv at one resolution, masked by `w`."""
        x = self.stem(x)
        if self.first is not None:
            x = self.first(x)
        b = 0
        for s, stage in enumerate(self.stages):
            out_mask = self.width_masks[s].mask(w["widths"][s])
            for block in stage:
                x = block(x, w["expansions"][b], w["kernels"][b], w["se"][b], out_mask)
                b += 1
        return self.head_conv(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """The resolution-mixed pre-pool map on the largest option's grid, scaled so that its
        plain average is the occupancy-normalised pool (see `dynlab.nn.dmasking.mix_placed`).
        One body pass per resolution option whose weight can be non-zero."""
        w, index = self._draw()
        self._last = w
        maps, weights, positions = [], [], []
        for i, r in enumerate(self.resolutions):
            if index is not None and i != index:
                continue  # a constant zero weight: the pass would add exactly nothing
            maps.append(self._body(subsample_nearest(x, (r, r)), w))
            weights.append(w["resolution"][i])
            positions.append(self.positions[i])
        return mix_placed(maps, weights, self.grid, positions)

    # --- expected cost ------------------------------------------------------------------------
    def _cost_table(self, kind: str) -> CostTable:
        """The `kind` coefficients of every layer (every resolution option for MACs), measured
        once on meta: the fixed layers whole, the searched ones at unit widths."""
        if kind in self._costs:
            return self._costs[kind]
        c = self.config
        geos = self._sizes if kind == "macs" else self._sizes[:1]
        with torch.device("meta"):
            stem = ConvBNAct(self.in_chans, c["stem_width"], 3, c["stem_stride"], act="hswish")
            first = None if self.first_spec is None else IRBlock(self.first_spec)
        fixed = []
        for sz in geos:
            cost = measure(kind, stem, (self.in_chans, *sz["input"]))
            if first is not None:
                cost += measure(kind, first, (c["stem_width"], *sz["stem_out"]))
            fixed.append(cost)
        blocks = range(len(self.search_blocks))
        se_w, se_out = unit_layer(kind, "conv_bias", 1, 1, 1, 1)  # on the pooled 1x1 map

        def conv_bn(j: int, key: str, kernel: int = 1, stride: int = 1) -> list[tuple[int, int]]:
            return [unit_layer(kind, "conv_bn", kernel, stride, *sz[key][j]) for sz in geos]

        self._costs[kind] = CostTable(
            fixed=fixed,
            pw=[conv_bn(j, "in") for j in blocks],
            dw=[
                [[sum(u) for u in conv_bn(j, "in", k, b.stride)] for k in self.kernels]
                for j, b in enumerate(self.search_blocks)
            ],
            # reduce mid -> s and expand s -> mid, both biased: exact per hidden option, as the
            # bottleneck s = se_width(mid) is a rounded function of mid
            se=[
                [
                    2 * se_w * m * s + se_out * (m + s)
                    for m, s in zip(b.mids, b.se_mids, strict=True)
                ]
                for b in self.search_blocks
            ],
            pwl=[conv_bn(j, "out") for j in blocks],
            head=[unit_layer(kind, "conv_bn", 1, 1, *sz["final"]) for sz in geos],
        )
        return self._costs[kind]

    def _cost_tensors(self, kind: str, device: torch.device) -> dict[str, Tensor]:
        """The `kind` cost table as float64 tensors on `device` (built once per kind and device):
        [geo] fixed, [block, geo, 2] pw/pwl, [block, kernel, geo] dw, [block, expansion] SE,
        [geo, 2] head conv (times its width), with the width options."""
        key = (kind, str(device))
        if key not in self._cost_cache:
            t = self._cost_table(kind)
            kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
            self._cost_cache[key] = {
                "fixed": torch.tensor(t.fixed, **kw),
                "pw": torch.tensor(t.pw, **kw),
                "dw": torch.tensor(t.dw, **kw),
                "se": torch.tensor(t.se, **kw),
                "pwl": torch.tensor(t.pwl, **kw),
                "head": torch.tensor(t.head, **kw) * float(self.head_pre),
                "mids": torch.tensor([b.mids for b in self.search_blocks], **kw),
                "se_on": torch.tensor([float(on) for on in self.se_options], **kw),
                "stage_of": torch.tensor([b.stage for b in self.search_blocks], device=device),
                **{f"widths_{i}": torch.tensor(w, **kw) for i, w in enumerate(self.stage_widths)},
            }
        return self._cost_cache[key]

    def softmax_weights(self) -> dict[str, Any]:
        """The search's distribution itself (every logit group's softmax, no noise): its
        `expected_cost(kind, weights)` is the expected cost of the architectures it samples."""
        w: dict[str, Any] = {"resolution": self.alpha_resolution.softmax(-1)}
        return w | {k: [t.softmax(-1) for t in self._alphas(k)] for k in CHOICE_KEYS[1:]}

    def expected_cost(self, kind: str = "macs", weights: Mapping[str, Any] | None = None) -> Tensor:
        """Expected cost of the exported child under the last forward's weights, or `weights`
        such as `softmax_weights()` (float64 scalar, differentiable in the logits; paper eqs.
        5-10): `kind` "macs" (per sample) or "params" (the count). Effective widths
        `sum_i g_i c_i` propagate layer to layer; each layer costs its
        measured coefficients times its expected input and output widths (plus a per-output-
        channel term: BN affines, biases), mixed over the resolution options for MACs (parameters
        do not depend on them: the resolution gets no gradient); depthwise: one width times the
        kernel mix; SE: g_on times its exact expectation over the hidden options. The choices are
        independent, so this is the exact expectation, and at one-hot weights exactly the
        child's count_macs / parameter count."""
        if kind not in COST_KINDS:
            raise ValueError(f"unknown cost kind {kind!r}; expected one of {COST_KINDS}")
        w = self.last_weights() if weights is None else weights
        res = w["resolution"].double()
        t = self._cost_tensors(kind, res.device)
        geo = res if kind == "macs" else res.new_ones(1)  # the geometries' weights
        stage_w = torch.stack(
            [(g.double() * t[f"widths_{i}"]).sum() for i, g in enumerate(w["widths"])]
        )
        e_out = stage_w[t["stage_of"]]  # each block's expected output width
        e_in = torch.cat([stage_w.new_full((1,), float(self.base_width)), e_out[:-1]])
        g_mid = torch.stack(w["expansions"]).double()
        e_mid = (g_mid * t["mids"]).sum(-1)
        g_k = torch.stack(w["kernels"]).double()
        dw = (g_k * (t["dw"] @ geo)).sum(-1)
        g_on = torch.stack(w["se"]).double() @ t["se_on"]
        pw = (t["pw"] * geo[:, None]).sum(-2)  # [block, (per in x out, per out)]
        pwl = (t["pwl"] * geo[:, None]).sum(-2)
        head = (t["head"] * geo[:, None]).sum(-2)
        per_block = (
            (pw[:, 0] * e_in + pw[:, 1]) * e_mid
            + dw * e_mid
            + g_on * (g_mid * t["se"]).sum(-1)
            + (pwl[:, 0] * e_mid + pwl[:, 1]) * e_out
        )
        post_pool = head_cost(kind, self.head_pre, self.config["head_width"], self.num_classes)
        return t["fixed"] @ geo + per_block.sum() + head[0] * e_out[-1] + head[1] + float(post_pool)

    def expected_macs(self) -> Tensor:
        """Expected MACs per sample of the last forward's weights (see `expected_cost`); at
        one-hot weights exactly count_macs of the child."""
        return self.expected_cost("macs")

    def expected_params(self) -> Tensor:
        """Expected parameter count of the child of the last forward's weights (FBNetV2-P's
        cost, see `expected_cost`): differentiable in the width, expansion, kernel and SE logits;
        at one-hot weights exactly `sum(p.numel() for p in child(choices).parameters())`."""
        return self.expected_cost("params")

    # --- children -----------------------------------------------------------------------------
    def _child_specs(self, c: Mapping[str, Any]) -> list[BlockSpec]:
        specs = [] if self.first_spec is None else [self.first_spec]
        cin = self.base_width
        for j, b in enumerate(self.search_blocks):
            cout = self.stage_widths[b.stage][c["widths"][b.stage]]
            e = c["expansions"][j]
            se = b.se_mids[e] if self.se_options[c["se"][j]] else 0
            k = self.kernels[c["kernels"][j]]
            specs.append(BlockSpec(cin, cout, b.stride, b.mids[e], k, b.act, se, True, b.residual))
            cin = cout
        return specs

    def _net_kwargs(self, c: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        return {
            "blocks": self._child_specs(c),
            "stem_width": cfg["stem_width"],
            "stem_stride": cfg["stem_stride"],
            "head_width": cfg["head_width"],
            "head_pre": self.head_pre,
            "resolution": self.resolutions[c["resolution"]],
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "drop_rate": cfg["drop_rate"],
            "choices": c,
        }

    def standalone(self, choices: Mapping[str, Any]) -> FBNetV2Net:
        """A fresh, untrained FBNetV2Net of `choices` (the child's architecture)."""
        return FBNetV2Net(**self._net_kwargs(self._checked(choices)))

    @torch.no_grad()
    def child(self, choices: Mapping[str, Any]) -> FBNetV2Net:
        """The FBNetV2Net of `choices` carrying the supernet's weights and BN statistics, sliced
        to its widths: in eval mode it computes what the supernet fixed at `choices` does."""
        c = self._checked(choices)
        device = self.alpha_resolution.device
        with torch.device(device):
            net = FBNetV2Net(**self._net_kwargs(c))
        net.stem.load_state_dict(self.stem.state_dict())
        offset = 0
        if self.first is not None:
            net.blocks[0].load_state_dict(self.first.state_dict())
            offset = 1
        cin = self.base_width
        kmax = max(self.kernels)
        for j, src in enumerate(self._blocks()):
            dst = net.blocks[offset + j]
            spec = net.specs[offset + j]
            mid, cout, k = spec.mid, spec.cout, spec.kernel
            _copy_conv_bn(src.pw, dst.pw, (slice(0, mid), slice(0, cin)))
            lo = (kmax - k) // 2
            _copy_conv_bn(
                src.dw, dst.dw, (slice(0, mid), slice(None), slice(lo, lo + k), slice(lo, lo + k))
            )
            if dst.se is not None:
                s = spec.se
                dst.se.reduce.weight.copy_(src.se_reduce.weight[:s, :mid])
                dst.se.reduce.bias.copy_(src.se_reduce.bias[:s])
                dst.se.expand.weight.copy_(src.se_expand.weight[:mid, :s])
                dst.se.expand.bias.copy_(src.se_expand.bias[:mid])
            _copy_conv_bn(src.pwl, dst.pwl, (slice(0, cout), slice(0, mid)))
            cin = cout
        _copy_conv_bn(self.head_conv, net.head_conv, (slice(None), slice(0, cin)))
        net.head.load_state_dict(self.head.state_dict())
        return net.train(self.training)

    def _blocks(self) -> list[DMaskBlock]:
        return [block for stage in self.stages for block in stage]

    # --- description --------------------------------------------------------------------------
    def signature(self) -> dict[str, Any]:
        """A JSON-able description of the space and head, to check checkpoint compatibility."""
        c = self.config
        out: dict[str, Any] = {"variant": VARIANTS[c["space"]]}
        for k, v in c.items():
            if k == "drop_rate":  # does not change the weights a checkpoint holds
                continue
            if k == "stage_widths":
                v = [list(s) for s in v]
            out[k] = list(v) if isinstance(v, tuple) else v
        return out

    def space_problem(self, input_size: Sequence[int]) -> str | None:
        """Why this space cannot run on (C, H, W) inputs (one line naming the fix), or None."""
        if len(input_size) != 3:
            return f"input size must be (C, H, W), got {tuple(input_size)}"
        ch, h, w = (int(v) for v in input_size)
        if ch != self.in_chans:
            return (
                f"the supernet takes {self.in_chans} input channels, the data has {ch}: "
                f"set in_chans={ch}"
            )
        too_big = [r for r in self.resolutions if r > min(h, w)]
        if too_big:
            return (
                f"resolution options {too_big} exceed the {h}x{w} input (the supernet only "
                f"subsamples): use resolutions <= {min(h, w)}"
            )
        return None


def _copy_conv_bn(src: ConvBNAct, dst: ConvBNAct, index: tuple[slice, ...]) -> None:
    """dst's conv weight = src's at `index`, dst's BN = src's first channels (state and stats)."""
    dst.conv.weight.copy_(src.conv.weight[index])
    n = dst.bn.num_features
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst.bn, name).copy_(getattr(src.bn, name)[:n])
    dst.bn.num_batches_tracked.copy_(src.bn.num_batches_tracked)
