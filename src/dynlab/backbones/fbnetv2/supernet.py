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
    block_sizes,
    cost_table,
    cost_tensors,
)
from dynlab.backbones.fbnetv2.layers import (
    BlockSpec,
    ConvBNAct,
    FBNetClassifier,
    FBNetHead,
    IRBlock,
    SkipBlock,
    divisible_width,
    init_weights,
    se_width,
)
from dynlab.backbones.fbnetv2.masked import BlockWeights, DMaskBlock, SearchBlock
from dynlab.backbones.fbnetv2.net import FBNetV2Net, json_choices
from dynlab.backbones.fbnetv2.space import (
    BLOCK_KEYS,
    CHOICE_KEYS,
    VARIANTS,
    hidden_options,
    space_config,
)
from dynlab.nn.dmasking import (
    ChannelMask,
    gumbel_weights,
    mix_placed,
    one_hot,
    receptive_positions,
    subsample_nearest,
)

# the logits' parameter name of each choice key (per block: name_<block index>)
_ALPHA = {
    "stem": "alpha_stem",
    "widths": "alpha_width",
    "ops": "alpha_op",
    "expansions": "alpha_expansion",
    "kernels": "alpha_kernel",
    "se": "alpha_se",
    "acts": "alpha_act",
    "head": "alpha_head",
}


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
        acts: Sequence[str | Sequence[str]] | None = None,
        expansions: Sequence[float] | None = None,
        hidden_step: int | None = None,
        kernels: Sequence[int] | None = None,
        se: Sequence[bool] | None = None,
        skip: bool | None = None,
        resolutions: Sequence[int] | None = None,
        stem_width: int | Sequence[int] | None = None,
        stem_stride: int | None = None,
        first_width: int | None = None,
        head_width: int | Sequence[int] | None = None,
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
            "hidden_step": hidden_step,
            "kernels": kernels,
            "se": se,
            "skip": skip,
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
        self.stem_widths: tuple[int, ...] = c["stem_width"]
        self.head_widths: tuple[int, ...] = c["head_width"]
        self.kernels: tuple[int, ...] = c["kernels"]
        self.se_options: tuple[bool, ...] = c["se"]

        # the fixed layers and the searchable blocks
        self.stem = ConvBNAct(in_chans, max(self.stem_widths), 3, c["stem_stride"], act="hswish")
        self.stem_mask = ChannelMask(self.stem_widths)
        ins: tuple[int, ...] = self.stem_widths
        self.first_spec: BlockSpec | None = None
        self.first: IRBlock | None = None
        if c["first_width"]:  # mobile-vision stage 1: `ir_k3_hs` e1, fixed
            width = self.stem_widths[0]
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
            ins = (c["first_width"],)
        self.input_widths = ins  # what the first searched block gets
        self.search_blocks: list[SearchBlock] = []
        for s, (widths, stride, repeats, acts) in enumerate(
            zip(c["stage_widths"], c["strides"], c["repeats"], c["acts"], strict=True)
        ):
            for j in range(repeats):
                step = stride if j == 0 else 1
                mids = hidden_options(max(ins), c["expansions"], c["hidden_step"])
                se_mids = tuple(se_width(m) for m in mids)
                if max(se_mids) != se_width(max(mids)):
                    raise ValueError(
                        f"block {len(self.search_blocks)}: SE widths {se_mids} not monotone"
                    )
                ops = ("ir", "skip") if c["skip"] and step == 1 else ("ir",)
                self.search_blocks.append(
                    SearchBlock(s, ins, widths, mids, se_mids, step, acts, ops)
                )
                ins = widths
        self.blocks = nn.ModuleList(
            DMaskBlock(b, self.kernels, self.se_options) for b in self.search_blocks
        )
        # the head: IRPoolBlock's pw at 6x the widest last width (mobile-vision rounds 6x the
        # chosen one: equal for F1-F4, whose last width is the widest), then the head width mask
        self.head_pre = divisible_width(max(ins) * 6)
        self.head_conv = ConvBNAct(max(ins), self.head_pre, 1, act="hswish")
        self.head = FBNetHead(self.head_pre, max(self.head_widths), num_classes, drop_rate)
        self.head_mask = ChannelMask(self.head_widths)
        self.num_features = self.head_pre
        self.head_hidden_size = max(self.head_widths)
        init_weights(self)

        # architecture logits (uniform at start: argmax picks the first option of each)
        self._alpha_names: dict[str, list[str]] = {k: [] for k in CHOICE_KEYS}

        def alpha(key: str, name: str, n: int) -> None:
            self.register_parameter(name, nn.Parameter(torch.zeros(n)))
            self._alpha_names[key].append(name)

        alpha("resolution", "alpha_resolution", len(self.resolutions))
        alpha("stem", _ALPHA["stem"], len(self.stem_widths))
        for i, b in enumerate(self.search_blocks):
            sizes = (len(b.outs), len(b.ops), len(b.mids), len(self.kernels))
            sizes += (len(self.se_options), len(b.acts))
            for key, n in zip(BLOCK_KEYS, sizes, strict=True):
                alpha(key, f"{_ALPHA[key]}_{i}", n)
        alpha("head", _ALPHA["head"], len(self.head_widths))

        self._geometry()
        self._fixed: dict[str, Any] | None = None
        self._last: dict[str, Any] | None = None
        self._costs: dict[tuple[Any, ...], CostTable] = {}
        self._cost_cache: dict[tuple[Any, ...], dict[str, Any]] = {}

    # --- geometry: sizes per resolution option, placement on the full grid -------------------
    def _geometry(self) -> None:
        """Per resolution option: every layer's input size (meta runs of unit convs), the output
        map size and its placement on the largest option's grid (ValueError when it cannot)."""
        c = self.config
        total_stride = c["stem_stride"] * math.prod(b.stride for b in self.search_blocks)
        strides = [b.stride for b in self.search_blocks]
        self._sizes = [
            block_sizes(r, c["stem_stride"], strides, max(self.kernels)) for r in self.resolutions
        ]
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
        """The option values of `choices`: resolution, stem width, per block its width, op,
        hidden width, kernel, SE and activation, and the head width."""
        c = self._checked(choices)
        blocks = self.search_blocks

        def per_block(key: str, options: Any) -> list[Any]:
            return [options(b)[i] for b, i in zip(blocks, c[key], strict=True)]

        return {
            "resolution": self.resolutions[c["resolution"]],
            "stem": self.stem_widths[c["stem"][0]],
            "widths": per_block("widths", lambda b: b.outs),
            "ops": per_block("ops", lambda b: b.ops),
            "mids": per_block("expansions", lambda b: b.mids),
            "kernels": [self.kernels[i] for i in c["kernels"]],
            "se": [self.se_options[i] for i in c["se"]],
            "acts": per_block("acts", lambda b: b.acts),
            "head": self.head_widths[c["head"][0]],
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
        """Stem .. last block .. the head's pre-pool conv at one resolution, masked by `w`."""
        g_in = w["stem"][0]
        x = self.stem_mask(self.stem(x), g_in)
        if self.first is not None:
            x = self.first(x)
            g_in = g_in.new_ones(1)
        for j, block in enumerate(self.blocks):
            g = [w[k][j] for k in BLOCK_KEYS]  # widths, ops, expansions, kernels, se, acts
            x = block(x, BlockWeights(g_in, g[0], g[1], g[2], g[3], g[4], g[5]))
            g_in = g[0]
        return self.head_conv(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """The resolution-mixed pre-pool map on the largest option's grid, scaled so that its
        plain average is the occupancy-normalised pool (see `dynlab.nn.dmasking.mix_placed`).
        One body pass per resolution option whose weight can be non-zero, on the image
        subsampled by nearest neighbour: the paper's spatial search mixes the
        resolutions differentiably by subsampling and placing each map back by interspersed
        zeros; the exported net resizes bilinearly, as the published models are evaluated."""
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

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """The FBNetHead with its head width masked by the last forward's weights."""
        h = self.head
        y = h.act(h.conv(x.mean((2, 3), keepdim=True))).flatten(1)
        y = h.drop(y * self.head_mask.mask(self.last_weights()["head"][0]).to(y.dtype))
        return y if pre_logits else h.fc(y)

    # --- expected cost ------------------------------------------------------------------------
    def _cost_tensors(self, kind: str, device: torch.device) -> dict[str, Any]:
        """The `kind` cost table (`cost.cost_table`, measured once) as float64 tensors on
        `device`, per block with its width options and the index pairs of equal widths."""
        key = (kind, str(device), self.num_classes)  # the classifier's cost follows reset
        if key not in self._cost_cache:
            if key[::2] not in self._costs:
                self._costs[key[::2]] = cost_table(self, kind)
            self._cost_cache[key] = cost_tensors(self, self._costs[key[::2]], device)
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
        `sum_i g_i c_i` propagate from block to block; each layer costs its measured coefficients
        times its expected input and output widths (plus a per-output-channel term), mixed over
        the resolution options for MACs (parameters do not depend on them); a layer built only at
        unequal widths (the pw when hidden != input, the skip's projection when out != in) drops
        the equal-width pairs' products; the block's op weights mix the ir and skip costs. The
        choices are independent, so this is the exact expectation, and at one-hot weights
        exactly the child's count_macs / parameter count."""
        if kind not in COST_KINDS:
            raise ValueError(f"unknown cost kind {kind!r}; expected one of {COST_KINDS}")
        w = self.last_weights() if weights is None else weights
        res = w["resolution"].double()
        t = self._cost_tensors(kind, res.device)
        geo = res if kind == "macs" else res.new_ones(1)  # the geometries' weights
        g_in = w["stem"][0].double()
        total = geo @ t["stem"] @ g_in
        e_in = (g_in * t["ins"]).sum() if self.first is None else t["ins"][0]
        if self.first is not None:
            g_in = g_in.new_ones(1)

        def unequal(
            g_a: Tensor, e_a: Tensor, g_b: Tensor, e_b: Tensor, pairs: Any
        ) -> tuple[Tensor, Tensor]:
            """E[a * b] and E[b] over the pairs a != b (independent a, b)."""
            ia, ib, ws = pairs
            both = g_a[ia] * g_b[ib]
            return e_a * e_b - (both * ws * ws).sum(), e_b - (both * ws).sum()

        for j, bt in enumerate(t["blocks"]):
            g_out = w["widths"][j].double()
            g_mid = w["expansions"][j].double()
            e_out, e_mid = (g_out * bt["outs"]).sum(), (g_mid * bt["mids"]).sum()
            pw, pwl = geo @ bt["pw"], geo @ bt["pwl"]
            pw_io, pw_o = unequal(g_in, e_in, g_mid, e_mid, bt["in_mid"])
            g_on = w["se"][j].double() @ t["se_on"]
            ir = pw[0] * pw_io + pw[1] * pw_o
            ir = ir + (w["kernels"][j].double() @ (bt["dw"] @ geo)) * e_mid
            ir = ir + g_on * (g_mid * bt["se"]).sum() + (pwl[0] * e_mid + pwl[1]) * e_out
            g_op = w["ops"][j].double()
            total = total + g_op[0] * ir
            if g_op.numel() > 1:
                proj = geo @ bt["proj"]
                pj_io, pj_o = unequal(g_in, e_in, g_out, e_out, bt["in_out"])
                total = total + g_op[1] * (proj[0] * pj_io + proj[1] * pj_o)
            g_in, e_in = g_out, e_out
        head = geo @ t["head"]
        return total + head[0] * e_in + head[1] + w["head"][0].double() @ t["post"]

    def expected_macs(self) -> Tensor:
        """Expected MACs per sample of the last forward's weights (see `expected_cost`); at
        one-hot weights exactly count_macs of the child."""
        return self.expected_cost("macs")

    def expected_params(self) -> Tensor:
        """Expected parameter count of the child of the last forward's weights (FBNetV2-P's
        cost, see `expected_cost`): differentiable in the width, op, hidden width, kernel, SE
        and head logits; at one-hot weights exactly the child's parameter count."""
        return self.expected_cost("params")

    # --- children -----------------------------------------------------------------------------
    def _child_specs(self, c: Mapping[str, Any]) -> list[BlockSpec]:
        """The child's blocks: mobile-vision's rules at its widths (irf_block.py IRFBlock: no pw
        when hidden == input; basic_blocks.py build_residual_connect: the residual add when
        in == out at stride 1, also on a stage's first block; Identity: skip)."""
        specs = [] if self.first_spec is None else [self.first_spec]
        cin = self.input_widths[0] if self.first is not None else self.stem_widths[c["stem"][0]]
        for j, b in enumerate(self.search_blocks):
            cout = b.outs[c["widths"][j]]
            if b.ops[c["ops"][j]] == "skip":
                specs.append(BlockSpec(cin, cout, b.stride, op="skip"))
            else:
                e = c["expansions"][j]
                mid, act = b.mids[e], b.acts[c["acts"][j]]
                se = b.se_mids[e] if self.se_options[c["se"][j]] else 0
                k, residual = self.kernels[c["kernels"][j]], b.stride == 1 and cin == cout
                specs.append(BlockSpec(cin, cout, b.stride, mid, k, act, se, cin != mid, residual))
            cin = cout
        return specs

    def _net_kwargs(self, c: dict[str, Any], resize: str) -> dict[str, Any]:
        cfg = self.config
        return {
            "blocks": self._child_specs(c),
            "stem_width": self.stem_widths[c["stem"][0]],
            "stem_stride": cfg["stem_stride"],
            "head_width": self.head_widths[c["head"][0]],
            "head_pre": self.head_pre,
            "resolution": self.resolutions[c["resolution"]],
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "drop_rate": cfg["drop_rate"],
            "choices": c,
            "resize": resize,
        }

    def standalone(self, choices: Mapping[str, Any]) -> FBNetV2Net:
        """A fresh, untrained FBNetV2Net of `choices` (the exported architecture, to retrain):
        it resizes its input bilinearly, as the published models are trained and evaluated."""
        return FBNetV2Net(**self._net_kwargs(self._checked(choices), "bilinear"))

    @torch.no_grad()
    def child(self, choices: Mapping[str, Any]) -> FBNetV2Net:
        """The FBNetV2Net of `choices` carrying the supernet's weights and BN statistics, sliced
        to its widths, with the supernet's nearest subsampling: in eval mode it computes what the
        supernet fixed at `choices` does (the deploy form of a search)."""
        c = self._checked(choices)
        device = self.alpha_resolution.device
        with torch.device(device):
            net = FBNetV2Net(**self._net_kwargs(c, "nearest"))
        cin = net.config["stem_width"]
        _copy_conv_bn(self.stem, net.stem, (slice(0, cin),))
        offset = 0
        if self.first is not None:
            net.blocks[0].load_state_dict(self.first.state_dict())
            offset, cin = 1, self.input_widths[0]
        kmax = max(self.kernels)
        for j, src in enumerate(self.blocks):
            dst, spec = net.blocks[offset + j], net.specs[offset + j]
            mid, cout, k = spec.mid, spec.cout, spec.kernel
            if isinstance(dst, SkipBlock):
                if dst.proj is not None:
                    _copy_conv_bn(src.proj, dst.proj, (slice(0, cout), slice(0, cin)))
                cin = cout
                continue
            if dst.pw is not None:
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
        width = net.head.width
        net.head.conv.weight.copy_(self.head.conv.weight[:width])
        if isinstance(net.head.fc, nn.Linear) and isinstance(self.head.fc, nn.Linear):
            net.head.fc.weight.copy_(self.head.fc.weight[:, :width])
            net.head.fc.bias.copy_(self.head.fc.bias)
        return net.train(self.training)

    # --- description --------------------------------------------------------------------------
    def signature(self) -> dict[str, Any]:
        """A JSON-able description of the space and head, to check checkpoint compatibility."""
        c = self.config
        out: dict[str, Any] = {"variant": VARIANTS[c["space"]]}
        for k, v in c.items():
            if k == "drop_rate":  # does not change the weights a checkpoint holds
                continue
            out[k] = _lists(v)
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


def _lists(value: Any) -> Any:
    """Nested tuples as nested lists (JSON's form)."""
    return [_lists(v) for v in value] if isinstance(value, tuple) else value
