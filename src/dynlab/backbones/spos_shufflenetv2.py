"""The Single Path One-Shot ShuffleNetV2 search space (Guo et al., ECCV 2020, Sec. 4) as timm
backbones: the weight-sharing supernet (`spos_supernet`, `cifar_spos_supernet`) and the standalone
network of one architecture (`spos_shufflenetv2`, `cifar_spos_shufflenetv2`).

Space (official megvii-model/SinglePathOneShot, src/Supernet/network.py and blocks.py): a 3x3
stride-2 stem to 16 channels (stride 1 for the CIFAR variant; no max pool in either), 4 stages of
(4, 4, 8, 4) searchable layers of widths (64, 160, 320, 640), each stage starting at stride 2, a
1x1 conv to 1024, global average pool, dropout 0.1 and a bias-free linear classifier. Each layer
picks one of four blocks (`BLOCKS`): ShuffleNetV2 units with 3x3/5x5/7x7 depthwise kernels and an
Xception-like unit with three depthwise 3x3 + pointwise stacks. At stride 2 a projection branch
keeps the input's channels and the main branch adds `out - in`; at stride 1 the input is split into
even channels (passed through) and odd channels (main branch), the official `channel_shuffle`.
The supernet's BatchNorms are non-affine, the standalone net's affine (official src/Evaluation/template/network.py).

Channel search (`channel_search=True`, paper Sec. 4 "channel number search"): each layer's mid
width is a scale from `CHANNEL_SCALES` of its base (half the layer's width), rounded down as the
official src/Evaluation/template/network.py does (`int(base * scale)`, here in exact integers:
`max(1, base * k // 5)` for scale k/5). The supernet block is built at 2.0x and a narrower choice
uses the first channels of every mid-width conv and BatchNorm (weights and running statistics).
The official code never released its channel-search supernet (SinglePathOneShot issue #1), so this
slicing scheme is ours.

Weight init follows the official `_initialize_weights`: stem conv N(0, 0.01), other convs
N(0, 1 / weight.shape[1]) (a std, so depthwise convs get std 1), affine BN weight 1 and bias 1e-4,
classifier N(0, 0.01).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import Tensor, nn

from dynlab.backbones._base import CifarClassifier, cifar_cfg, imagenet_cfg, reinitialise
from dynlab.backbones.registry import register_backbone
from dynlab.capabilities import Capability
from dynlab.evaluation.macs import count_macs

__all__ = [
    "BLOCKS",
    "CHANNEL_SCALES",
    "OFFICIAL_ARCH",
    "MacsTable",
    "SPOSNet",
    "SPOSSupernet",
    "SearchSpace",
    "mid_channels",
]

BLOCKS = ("shuffle3", "shuffle5", "shuffle7", "xception")
_KERNELS = (3, 5, 7, 3)  # depthwise kernel of each block (the Xception unit is all 3x3)
CHANNEL_SCALES = tuple(k / 5 for k in range(1, 11))  # 0.2, 0.4, ..., 2.0 (paper Sec. 4)
_UNIT_SCALE = CHANNEL_SCALES.index(1.0)
# Official README: 323M FLOPs, 3.5M params, 25.6 top-1 error.
OFFICIAL_ARCH = (2, 1, 0, 1, 2, 0, 2, 0, 2, 0, 2, 3, 0, 0, 0, 0, 3, 2, 3, 3)
_VARIANT = "spos_shufflenetv2"


def mid_channels(base: int, scale: int | None) -> int:
    """Mid width of a layer of base mid width `base` at scale index `scale` (None: 1.0x):
    floor(base * CHANNEL_SCALES[scale]) computed exactly, at least 1."""
    return base if scale is None else max(1, base * (scale + 1) // 5)


# --- the search space ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSpace:
    """A candidate is one flat gene tuple: a block id per layer, then (with channel search) a
    scale index per layer. A space with an identity choice (`identity`: the last block id, the
    layer skipped; AngleNAS's MobileNet space) has layers that cannot skip it (`no_identity`, where
    the stride or width changes): their block ids stop before it."""

    num_layers: int
    num_blocks: int = len(BLOCKS)
    num_scales: int = 0  # 0: no channel search
    identity: bool = False
    no_identity: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.num_blocks < 1:
            raise ValueError(f"a search space needs layers and blocks, got {self}")
        if self.num_scales not in (0, len(CHANNEL_SCALES)):
            raise ValueError(f"num_scales is 0 or {len(CHANNEL_SCALES)}, got {self.num_scales}")

    @property
    def num_genes(self) -> int:
        """Length of a candidate."""
        return self.num_layers * (2 if self.num_scales else 1)

    def gene_choices(self) -> list[int]:
        """Number of choices of each gene (blocks per layer, then scales per layer)."""
        blocks = [
            self.num_blocks - int(self.identity and i in self.no_identity)
            for i in range(self.num_layers)
        ]
        return blocks + [self.num_scales] * (self.num_layers if self.num_scales else 0)

    @property
    def identity_block(self) -> int | None:
        """The block id that skips a layer, or None."""
        return self.num_blocks - 1 if self.identity else None

    def split(self, genes: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """(block ids, scale indices or None without channel search) of a candidate."""
        genes = tuple(int(g) for g in genes)
        arch = genes[: self.num_layers]
        return arch, (genes[self.num_layers :] if self.num_scales else None)

    def default_scales(self) -> tuple[int, ...] | None:
        """The scale indices of 1.0x on every layer (None without channel search)."""
        return (_UNIT_SCALE,) * self.num_layers if self.num_scales else None

    def describe(self) -> str:
        """What a candidate looks like, for messages."""
        text = f"{self.num_genes} genes: {self.num_layers} block ids in 0..{self.num_blocks - 1}"
        if self.identity:
            text += f" ({self.num_blocks - 1}: identity, not on layers {list(self.no_identity)})"
        if self.num_scales:
            text += f", then {self.num_layers} channel-scale indices in 0..{self.num_scales - 1}"
        return text

    def problem(self, genes: Sequence[Any]) -> str | None:
        """Why `genes` is not a candidate of this space (one line), or None when it is."""
        try:
            values = list(genes)
        except TypeError:
            return f"expected a sequence of {self.describe()}; got {genes!r}"
        if len(values) != self.num_genes:
            return f"expected {self.describe()}; got {len(values)} genes"
        for i, (g, n) in enumerate(zip(values, self.gene_choices(), strict=True)):
            if isinstance(g, bool) or not hasattr(g, "__index__") or not 0 <= int(g) < n:
                kind = "block id" if i < self.num_layers else "channel-scale index"
                return (
                    f"gene {i} ({kind} of layer {i % self.num_layers}) is {g!r}, expected an int "
                    f"in 0..{n - 1} (a candidate is {self.describe()})"
                )
        return None


class LayerSpec(NamedTuple):
    """One searchable layer: input and output channels, stride, base mid width (out // 2)."""

    inp: int
    oup: int
    stride: int
    base_mid: int


def layer_specs(
    stem_channels: int, stage_repeats: Sequence[int], widths: Sequence[int]
) -> list[LayerSpec]:
    """The searchable layers of the space, first layer of each stage at stride 2 (official)."""
    if len(stage_repeats) != len(widths) or not stage_repeats:
        raise ValueError(f"stage_repeats {stage_repeats} and widths {widths} differ in length")
    specs, inp = [], stem_channels
    for repeats, width in zip(stage_repeats, widths, strict=True):
        if repeats < 1:
            raise ValueError(f"every stage needs at least one layer, got {stage_repeats}")
        for i in range(repeats):
            stride = 2 if i == 0 else 1
            main_out = width - inp if stride == 2 else width - (inp + 1) // 2
            if main_out < 1 or width // 2 < 1:
                raise ValueError(
                    f"a {inp}->{width} layer at stride {stride} leaves no channels for the main "
                    f"branch: each stage must be wider than the one before (stem {stem_channels}, "
                    f"widths {tuple(widths)})"
                )
            specs.append(LayerSpec(inp, width, stride, width // 2))
            inp = width
    return specs


# --- blocks -------------------------------------------------------------------------------------
class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (+ ReLU) that can run on the first `mid` channels of the sides
    marked as mid width, slicing its weights and BN statistics (channel search)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        *,
        depthwise: bool = False,
        relu: bool = False,
        affine: bool = True,
        mid_in: bool = False,
        mid_out: bool = False,
    ) -> None:
        super().__init__()
        groups = cin if depthwise else 1
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, affine=affine)
        self.relu = nn.ReLU(inplace=True) if relu else None
        self.depthwise, self.mid_in, self.mid_out = depthwise, mid_in, mid_out

    def sliced(self, mid: int | None) -> bool:
        """Whether running at mid width `mid` needs slices of the full weights."""
        full = self.conv.out_channels if self.mid_out else self.conv.in_channels
        return mid is not None and (self.mid_in or self.mid_out) and mid != full

    def conv_weight(self, mid: int | None) -> Tensor:
        """The conv weight at mid width `mid` (a view of the full weight)."""
        w = self.conv.weight
        if mid is None:
            return w
        if self.mid_out:
            w = w[:mid]
        if self.mid_in and not self.depthwise:
            w = w[:, :mid]
        return w

    def bn_slice(self, mid: int | None) -> slice:
        """The BN channels in use at mid width `mid`."""
        return slice(0, mid) if mid is not None and self.mid_out else slice(None)

    def forward(self, x: Tensor, mid: int | None = None) -> Tensor:
        if not self.sliced(mid):
            y = self.bn(self.conv(x))
        else:
            w = self.conv_weight(mid)
            conv = self.conv
            groups = w.shape[0] if self.depthwise else 1
            y = _sliced_batch_norm(
                F.conv2d(x, w, None, conv.stride, conv.padding, groups=groups),
                self.bn,
                self.bn_slice(mid),
            )
        return self.relu(y) if self.relu is not None else y


def _sliced_batch_norm(x: Tensor, bn: nn.BatchNorm2d, idx: slice) -> Tensor:
    """`bn` on channels `idx` only: its running statistics are updated in place through the
    slice in training mode, as nn.BatchNorm2d would for the whole layer."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or bn.running_mean is None
    stats = bn.running_mean is not None and (bn.track_running_stats or not bn.training)
    return F.batch_norm(
        x,
        bn.running_mean[idx] if stats else None,
        bn.running_var[idx] if stats else None,
        bn.weight[idx] if bn.weight is not None else None,
        bn.bias[idx] if bn.bias is not None else None,
        use_batch_stats,
        momentum,
        bn.eps,
    )


def _split(x: Tensor) -> tuple[Tensor, Tensor]:
    """The official `channel_shuffle` of a stride-1 unit (blocks.py): even channels pass through,
    odd channels go through the main branch."""
    return x[:, 0::2], x[:, 1::2]


class ChoiceBlock(nn.Module):
    """One choice of a layer: `Shufflenet` (blocks 0-2, k = 3/5/7) or `Shuffle_Xception`
    (block 3) of the official blocks.py, `mid` wide; output = cat(projection, main)."""

    def __init__(self, block: int, spec: LayerSpec, mid: int, affine: bool) -> None:
        super().__init__()
        inp, oup, stride, _ = spec
        k = _KERNELS[block]
        self.block, self.stride = block, stride
        main_in = inp if stride == 2 else inp // 2
        main_out = oup - inp if stride == 2 else oup - (inp + 1) // 2

        def cb(cin: int, cout: int, kernel: int, s: int = 1, **kw: bool) -> ConvBN:
            return ConvBN(cin, cout, kernel, s, affine=affine, **kw)

        if block < 3:  # pw (ReLU), dw k x k (stride), pw-linear (ReLU)
            main = [
                cb(main_in, mid, 1, relu=True, mid_out=True),
                cb(mid, mid, k, stride, depthwise=True, mid_in=True, mid_out=True),
                cb(mid, main_out, 1, relu=True, mid_in=True),
            ]
        else:  # dw3x3 (stride) + pw, three times; the first dw is on the input channels
            main = [
                cb(main_in, main_in, 3, stride, depthwise=True),
                cb(main_in, mid, 1, relu=True, mid_out=True),
                cb(mid, mid, 3, depthwise=True, mid_in=True, mid_out=True),
                cb(mid, mid, 1, relu=True, mid_in=True, mid_out=True),
                cb(mid, mid, 3, depthwise=True, mid_in=True, mid_out=True),
                cb(mid, main_out, 1, relu=True, mid_in=True),
            ]
        self.main = nn.ModuleList(main)
        self.proj: nn.ModuleList | None = None
        if stride == 2:  # dw k x k stride 2 + BN, pw-linear inp -> inp + BN + ReLU
            self.proj = nn.ModuleList(
                [cb(inp, inp, k, 2, depthwise=True), cb(inp, inp, 1, relu=True)]
            )

    def forward(self, x: Tensor, mid: int | None = None) -> Tensor:
        if self.proj is None:
            passed, x = _split(x)
        else:
            passed = x
            for unit in self.proj:
                passed = unit(passed)
        for unit in self.main:
            x = unit(x, mid)
        return torch.cat((passed, x), dim=1)

    def units(self) -> list[ConvBN]:
        """Every conv+BN of the block, main branch first."""
        return [*self.main, *(self.proj or [])]

    @torch.no_grad()
    def copy_to(self, target: ChoiceBlock, mid: int | None) -> None:
        """Copy this block's weights and BN state at mid width `mid` into `target`, a block of
        the same choice built `mid` wide."""
        for src, dst in zip(self.units(), target.units(), strict=True):
            dst.conv.weight.copy_(src.conv_weight(mid))
            idx = src.bn_slice(mid)
            for name in ("weight", "bias", "running_mean", "running_var"):
                s, d = getattr(src.bn, name), getattr(dst.bn, name)
                if s is not None and d is not None:
                    d.copy_(s[idx])
            if src.bn.num_batches_tracked is not None and dst.bn.num_batches_tracked is not None:
                dst.bn.num_batches_tracked.copy_(src.bn.num_batches_tracked)


# --- networks -----------------------------------------------------------------------------------
class _BiasFreeHead(nn.Module):
    """Global average pool, dropout and a bias-free linear classifier (official src/Supernet/network.py)."""

    def __init__(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        super().__init__()
        self.num_features = num_features
        self.drop = nn.Dropout(drop_rate)
        self.fc: nn.Module = nn.Identity()
        self.reset(num_classes)

    def reset(self, num_classes: int) -> None:
        """A fresh N(0, 0.01) classifier for `num_classes` (0: none)."""
        if num_classes > 0:
            device = next(self.fc.parameters(), torch.empty(0)).device
            self.fc = nn.Linear(self.num_features, num_classes, bias=False, device=device)
            nn.init.normal_(self.fc.weight, 0, 0.01)
        else:
            self.fc = nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return x if pre_logits else self.fc(x)


def _space_config(
    num_classes: int,
    in_chans: int,
    cifar_stem: bool,
    stage_repeats: Sequence[int],
    widths: Sequence[int],
    stem_channels: int,
    last_channels: int,
    channel_search: bool,
) -> dict[str, Any]:
    """The constructor arguments that fix the space and the head, normalised (Hydra lists ->
    tuples of ints)."""
    return {
        "num_classes": int(num_classes),
        "in_chans": int(in_chans),
        "cifar_stem": bool(cifar_stem),
        "stage_repeats": tuple(int(r) for r in stage_repeats),
        "widths": tuple(int(w) for w in widths),
        "stem_channels": int(stem_channels),
        "last_channels": int(last_channels),
        "channel_search": bool(channel_search),
    }


class _SPOSBase(CifarClassifier):
    """Stem, last conv and bias-free head shared by the supernet and the standalone net."""

    def __init__(self, config: dict[str, Any], drop_rate: float, affine: bool) -> None:
        super().__init__(config["last_channels"], 0, drop_rate)
        self.config = config
        self.drop_rate = drop_rate
        self.specs = layer_specs(config["stem_channels"], config["stage_repeats"], config["widths"])
        self.space = SearchSpace(
            len(self.specs), len(BLOCKS), len(CHANNEL_SCALES) if config["channel_search"] else 0
        )
        stem_stride = 1 if config["cifar_stem"] else 2
        self.stem = nn.Sequential(
            nn.Conv2d(config["in_chans"], config["stem_channels"], 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(config["stem_channels"], affine=affine),
            nn.ReLU(inplace=True),
        )
        self.conv_last = nn.Sequential(
            nn.Conv2d(config["widths"][-1], config["last_channels"], 1, bias=False),
            nn.BatchNorm2d(config["last_channels"], affine=affine),
            nn.ReLU(inplace=True),
        )
        self.head = _BiasFreeHead(config["last_channels"], config["num_classes"], drop_rate)
        self.num_classes = config["num_classes"]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh bias-free one for `num_classes` (0 removes it)."""
        super().reset_classifier(num_classes)
        self.config = {**self.config, "num_classes": int(num_classes)}

    def signature(self) -> dict[str, Any]:
        """A JSON-able description of the space and head, to check checkpoint compatibility."""
        c = self.config
        return {
            "variant": f"cifar_{_VARIANT}" if c["cifar_stem"] else _VARIANT,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in c.items()},
        }

    def _mid(self, layer: int, scales: tuple[int, ...] | None) -> int | None:
        """Mid width of `layer` at the given scales (None: no channel search, base width)."""
        return None if scales is None else mid_channels(self.specs[layer].base_mid, scales[layer])


def spos_init(model: nn.Module) -> None:
    """Official `_initialize_weights` (src/Supernet/network.py): stem conv N(0, 0.01), other convs
    N(0, 1/weight.shape[1]), BN weight 1, bias 1e-4, running mean 0, linear N(0, 0.01)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            std = 0.01 if name.startswith("stem") else 1.0 / m.weight.shape[1]
            nn.init.normal_(m.weight, 0, std)
        elif isinstance(m, nn.BatchNorm2d):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 1e-4)
            if m.running_mean is not None:
                nn.init.zeros_(m.running_mean)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SPOSSupernet(_SPOSBase):
    """The one-shot supernet: every layer holds all four blocks (at 2.0x mid width with channel
    search) with non-affine BN; `forward` runs the path set by `set_path` only."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.1,
        cifar_stem: bool = False,
        stage_repeats: Sequence[int] = (4, 4, 8, 4),
        widths: Sequence[int] = (64, 160, 320, 640),
        stem_channels: int = 16,
        last_channels: int = 1024,
        channel_search: bool = False,
    ) -> None:
        config = _space_config(
            num_classes,
            in_chans,
            cifar_stem,
            stage_repeats,
            widths,
            stem_channels,
            last_channels,
            channel_search,
        )
        super().__init__(config, drop_rate, affine=False)
        widest = len(CHANNEL_SCALES) - 1 if channel_search else None
        self.layers = nn.ModuleList(
            nn.ModuleList(
                ChoiceBlock(b, spec, mid_channels(spec.base_mid, widest), affine=False)
                for b in range(len(BLOCKS))
            )
            for spec in self.specs
        )
        spos_init(self)
        arch, scales = (0,) * self.space.num_layers, self.space.default_scales()
        self._path: tuple[int, ...] = arch + (scales or ())

    @property
    def path(self) -> tuple[int, ...]:
        """The genes `forward` runs (block ids, then scale indices with channel search)."""
        return self._path

    def active(self) -> tuple[int, ...]:
        """The candidate `forward` runs now (its path), what `child` of it cuts out."""
        return self._path

    def set_path(self, genes: Sequence[int]) -> None:
        """Run the candidate `genes` from now on; ValueError if it is not one of the space."""
        problem = self.space.problem(genes)
        if problem:
            raise ValueError(f"SPOS supernet path: {problem}")
        self._path = tuple(int(g) for g in genes)

    def forward_features(self, x: Tensor) -> Tensor:
        """The map after the last 1x1 conv along the current path."""
        arch, scales = self.space.split(self._path)
        x = self.stem(x)
        for i, (choices, block) in enumerate(zip(self.layers, arch, strict=True)):
            x = choices[block](x, self._mid(i, scales))
        return self.conv_last(x)

    def reset_weights(self) -> None:
        """Fresh weights and BN statistics, as at construction (from the torch RNG)."""
        reinitialise(self, spos_init)

    def macs_table(self, input_size: tuple[int, int, int]) -> MacsTable:
        """The space's MACs table at `input_size` (`MacsTable.measure`)."""
        return MacsTable.measure(self, input_size)

    def layer_params(self, layer: int, block: int) -> list[nn.Parameter]:
        """The parameters of choice `block` of `layer` (to clear grads of unsampled choices)."""
        return list(self.layers[layer][block].parameters())

    def _net_kwargs(self) -> dict[str, Any]:
        return {**self.config, "drop_rate": self.drop_rate}

    def path_weights(self, genes: Sequence[int]) -> list[tuple[Any, Tensor]]:
        """The conv and classifier weights candidate `genes` runs through, no BN and no biases
        (AngleNAS's path vector, official AngleNAS SPOS/shrinking/shrinking.py get_arch_vector),
        each under a name that is the same for the same tensor in any path (sliced to its width)."""
        arch, scales = self.space.split(self._checked(genes))
        pieces: list[tuple[Any, Tensor]] = [
            ("stem", self.stem[0].weight),
            ("conv_last", self.conv_last[0].weight),
        ]
        if isinstance(self.head.fc, nn.Linear):
            pieces.append(("fc", self.head.fc.weight))
        for i, block in enumerate(arch):
            mid = self._mid(i, scales)
            for u, unit in enumerate(self.layers[i][block].units()):
                pieces.append(((i, block, mid, u), unit.conv_weight(mid)))
        return pieces

    def child(self, genes: Sequence[int]) -> SPOSNet:
        """The standalone net of `genes` (non-affine BN) carrying the supernet's weights and BN
        statistics, sliced to its widths: in eval mode it computes what the supernet does."""
        arch, scales = self.space.split(self._checked(genes))
        device = next(self.parameters()).device
        net = SPOSNet(arch=arch, scales=scales, affine=False, **self._net_kwargs()).to(device)
        net.stem.load_state_dict(self.stem.state_dict())
        net.conv_last.load_state_dict(self.conv_last.state_dict())
        net.head.load_state_dict(self.head.state_dict())
        for i, (choices, block) in enumerate(zip(self.layers, arch, strict=True)):
            choices[block].copy_to(net.layers[i], self._mid(i, scales))
        return net.train(self.training)

    def standalone(self, genes: Sequence[int]) -> SPOSNet:
        """A fresh, untrained standalone net of `genes` with affine BN (for retraining)."""
        arch, scales = self.space.split(self._checked(genes))
        return SPOSNet(arch=arch, scales=scales, affine=True, **self._net_kwargs())

    def _checked(self, genes: Sequence[int]) -> tuple[int, ...]:
        problem = self.space.problem(genes)
        if problem:
            raise ValueError(f"SPOS candidate: {problem}")
        return tuple(int(g) for g in genes)


class SPOSNet(_SPOSBase):
    """The standalone network of one architecture of the space, from plain conv/BN layers
    (official src/Evaluation/template/network.py); `arch` defaults to `OFFICIAL_ARCH`, `scales` given
    implies channel search (None there: 1.0x everywhere)."""

    def __init__(
        self,
        arch: Sequence[int] | None = None,
        scales: Sequence[int] | None = None,
        affine: bool = True,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.1,
        cifar_stem: bool = False,
        stage_repeats: Sequence[int] = (4, 4, 8, 4),
        widths: Sequence[int] = (64, 160, 320, 640),
        stem_channels: int = 16,
        last_channels: int = 1024,
        channel_search: bool = False,
    ) -> None:
        config = _space_config(
            num_classes,
            in_chans,
            cifar_stem,
            stage_repeats,
            widths,
            stem_channels,
            last_channels,
            channel_search or scales is not None,
        )
        super().__init__(config, drop_rate, affine)
        if arch is None:
            if self.space.num_layers != len(OFFICIAL_ARCH):
                raise ValueError(
                    f"SPOSNet: give `arch` ({self.space.describe()}); the default, the official "
                    f"architecture, has {len(OFFICIAL_ARCH)} layers"
                )
            arch = OFFICIAL_ARCH
        if self.space.num_scales and scales is None:
            scales = self.space.default_scales()
        genes = tuple(arch) + tuple(scales or ())
        problem = self.space.problem(genes)
        if problem:
            raise ValueError(f"SPOSNet architecture: {problem}")
        self.arch, self.scales = self.space.split(genes)
        self.layers = nn.ModuleList(
            ChoiceBlock(b, spec, self._mid(i, self.scales) or spec.base_mid, affine)
            for i, (spec, b) in enumerate(zip(self.specs, self.arch, strict=True))
        )
        spos_init(self)

    @property
    def genes(self) -> tuple[int, ...]:
        """This net's candidate: block ids, then scale indices with channel search."""
        return self.arch + (self.scales or ())

    def forward_features(self, x: Tensor) -> Tensor:
        """The map after the last 1x1 conv, [B, last_channels, H/32, W/32] (H/16 CIFAR stem)."""
        x = self.stem(x)
        for block in self.layers:
            x = block(x)
        return self.conv_last(x)


# --- measured MACs ------------------------------------------------------------------------------
class MacsTable:
    """Per-sample MACs of every choice of every layer (and of the fixed stem, last conv and
    classifier), each measured with `count_macs` on its standalone module at the layer's input
    resolution; a candidate's MACs are the sum, equal to `count_macs` of its standalone net."""

    def __init__(
        self,
        space: SearchSpace,
        fixed: float,
        layers: Sequence[Sequence[Sequence[float]]],
        input_size: Sequence[int],
    ) -> None:
        self.space, self.fixed = space, float(fixed)
        self.layers = [[[float(m) for m in scales] for scales in blocks] for blocks in layers]
        self.input_size = tuple(int(d) for d in input_size)
        per_layer = max(space.num_scales, 1)
        if len(self.layers) != space.num_layers or any(
            len(blocks) != space.num_blocks or any(len(s) != per_layer for s in blocks)
            for blocks in self.layers
        ):
            raise ValueError(f"a MACs table of the wrong shape for {space}")

    @classmethod
    def measure(
        cls, supernet: SPOSSupernet | Mapping[str, Any], input_size: tuple[int, int, int]
    ) -> MacsTable:
        """Measure the table of a supernet (or of its constructor kwargs) at `input_size`; the
        modules measured are built on the meta device, so nothing is allocated."""
        if isinstance(supernet, SPOSSupernet):
            config = supernet.config
        else:
            kwargs = dict(supernet)
            kwargs.pop("drop_rate", None)
            defaults = {k: v for k, v in _SUPERNET_DEFAULTS.items() if k not in kwargs}
            config = _space_config(**defaults, **kwargs)
        with torch.device("meta"):
            frame = SPOSNet(arch=(0,) * sum(config["stage_repeats"]), affine=False, **config)
            fixed = count_macs(frame.stem, input_size)
            x = frame.stem(torch.zeros(1, *input_size))
            layers = []
            for spec in frame.specs:
                size = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
                scales = range(len(CHANNEL_SCALES)) if frame.space.num_scales else [None]
                layers.append(
                    [
                        [_block_macs(b, spec, mid_channels(spec.base_mid, s), size) for s in scales]
                        for b in range(len(BLOCKS))
                    ]
                )
                x = ChoiceBlock(0, spec, spec.base_mid, affine=False).eval()(x)
            size = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
            fixed += count_macs(nn.Sequential(frame.conv_last, frame.head), size)
        return cls(frame.space, fixed, layers, input_size)

    def _entries(self, genes: Sequence[int]) -> list[float]:
        problem = self.space.problem(genes)
        if problem:
            raise ValueError(f"MACs of an SPOS candidate: {problem}")
        arch, scales = self.space.split(genes)
        return [
            self.layers[i][b][scales[i] if scales is not None else 0] for i, b in enumerate(arch)
        ]

    def macs(self, genes: Sequence[int]) -> float:
        """Per-sample MACs of candidate `genes`."""
        return self.fixed + math.fsum(self._entries(genes))

    def minimum(self) -> float:
        """The cheapest candidate's MACs (the cheapest choice on every layer)."""
        return self.fixed + math.fsum(min(min(s) for s in blocks) for blocks in self._choices())

    def maximum(self) -> float:
        """The dearest candidate's MACs (the dearest choice on every layer)."""
        return self.fixed + math.fsum(max(max(s) for s in blocks) for blocks in self._choices())

    def _choices(self) -> list[list[list[float]]]:
        """Each layer's entries of the blocks it may choose."""
        counts = self.space.gene_choices()
        return [blocks[: counts[i]] for i, blocks in enumerate(self.layers)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form, e.g. to store in a checkpoint."""
        return {
            "space": {
                "num_layers": self.space.num_layers,
                "num_blocks": self.space.num_blocks,
                "num_scales": self.space.num_scales,
                "identity": self.space.identity,
                "no_identity": list(self.space.no_identity),
            },
            "input_size": list(self.input_size),
            "fixed": self.fixed,
            "layers": copy.deepcopy(self.layers),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MacsTable:
        """The table `to_dict` gave."""
        space = {**data["space"], "no_identity": tuple(data["space"].get("no_identity", ()))}
        return cls(SearchSpace(**space), data["fixed"], data["layers"], data["input_size"])


@functools.lru_cache(maxsize=4096)
def _block_macs(block: int, spec: LayerSpec, mid: int, size: tuple[int, int, int]) -> int:
    """count_macs of choice `block` of a `spec` layer, `mid` wide, on a `size` input (layers of
    the same shape are measured once). Built on meta without its BatchNorms: count_macs counts
    none (conv and matmul ops only) and BN on meta is what made measuring slow (decomposed
    under the flop counter, 3x the time); the tests check the sums against count_macs of whole
    standalone nets, BN included."""
    with torch.device("meta"):
        module = ChoiceBlock(block, spec, mid, affine=False)
    for unit in module.units():
        unit.bn = nn.Identity()  # type: ignore[assignment]
    return count_macs(module, size)


_SUPERNET_DEFAULTS: dict[str, Any] = {
    "num_classes": 1000,
    "in_chans": 3,
    "cifar_stem": False,
    "stage_repeats": (4, 4, 8, 4),
    "widths": (64, 160, 320, 640),
    "stem_channels": 16,
    "last_channels": 1024,
    "channel_search": False,
}


# --- timm registration --------------------------------------------------------------------------
default_cfgs = generate_default_cfgs(
    {
        "spos_supernet": imagenet_cfg("stem.0", "head.fc", "bilinear"),
        "cifar_spos_supernet": cifar_cfg((2, 2), "stem.0"),
        "cifar_spos_supernet_tiny": cifar_cfg((2, 2), "stem.0"),
        "cifar_spos_supernet_small": cifar_cfg((4, 4), "stem.0"),
        "spos_shufflenetv2": imagenet_cfg("stem.0", "head.fc", "bilinear"),
        "cifar_spos_shufflenetv2": cifar_cfg((2, 2), "stem.0"),
    }
)


@register_backbone(Capability.spos_supernet)
def spos_supernet(pretrained: bool = False, **kwargs: Any) -> SPOSSupernet:
    """The SPOS ShuffleNetV2 one-shot supernet for ImageNet (224x224)."""
    return build_model_with_cfg(SPOSSupernet, "spos_supernet", pretrained, **kwargs)


@register_backbone(Capability.spos_supernet)
def cifar_spos_supernet(pretrained: bool = False, **kwargs: Any) -> SPOSSupernet:
    """The SPOS supernet with a stride-1 stem, for 32x32 inputs."""
    return build_model_with_cfg(
        SPOSSupernet, "cifar_spos_supernet", pretrained, cifar_stem=True, **kwargs
    )


# A 5-layer space (stages repeated 1/1/2/1, widths 16/32/64/128, stem 8, last conv 128) with the
# paper's four choices per layer: 1,024 paths, for tests and CPU runs on digits.
_TINY_SPACE: dict[str, Any] = {
    "stage_repeats": (1, 1, 2, 1),
    "widths": (16, 32, 64, 128),
    "stem_channels": 8,
    "last_channels": 128,
}


@register_backbone(Capability.spos_supernet)
def cifar_spos_supernet_tiny(pretrained: bool = False, **kwargs: Any) -> SPOSSupernet:
    """The tiny SPOS space (`_TINY_SPACE`) with a stride-1 stem, for 32x32 inputs on CPU."""
    return build_model_with_cfg(
        SPOSSupernet,
        "cifar_spos_supernet_tiny",
        pretrained,
        cifar_stem=True,
        **{**_TINY_SPACE, **kwargs},
    )


# A small space for 32x32 grey images on CPU whose range brackets ~10 M and ~20 M MACs at 1x32x32
# (5.2-31 M; 1.9 M supernet parameters): the paper's four blocks per layer, 7 layers in 3 stages
# (2/3/2, widths 80/160/320, stem 16, last conv 512) and the paper's channel search (Sec. 4) on by
# default, since the four blocks alone span only ~1.5x in MACs. Deviations from the paper's space:
# 3 stages, not 4 (the stride-1 stem keeps 32x32, so three stride-2 stages end at 4x4 as the
# paper's end at 7x7), and narrower widths and last conv.
_SMALL_SPACE: dict[str, Any] = {
    "stage_repeats": (2, 3, 2),
    "widths": (80, 160, 320),
    "stem_channels": 16,
    "last_channels": 512,
    "channel_search": True,
}


@register_backbone(Capability.spos_supernet)
def cifar_spos_supernet_small(pretrained: bool = False, **kwargs: Any) -> SPOSSupernet:
    """The small SPOS space (`_SMALL_SPACE`, channel search on) for 32x32 inputs on CPU."""
    return build_model_with_cfg(
        SPOSSupernet,
        "cifar_spos_supernet_small",
        pretrained,
        cifar_stem=True,
        **{**_SMALL_SPACE, **kwargs},
    )


@register_backbone()
def spos_shufflenetv2(pretrained: bool = False, **kwargs: Any) -> SPOSNet:
    """A standalone SPOS network for ImageNet; by default the official searched architecture."""
    return build_model_with_cfg(SPOSNet, "spos_shufflenetv2", pretrained, **kwargs)


@register_backbone()
def cifar_spos_shufflenetv2(pretrained: bool = False, **kwargs: Any) -> SPOSNet:
    """A standalone SPOS network with a stride-1 stem, for 32x32 inputs."""
    return build_model_with_cfg(
        SPOSNet, "cifar_spos_shufflenetv2", pretrained, cifar_stem=True, **kwargs
    )
