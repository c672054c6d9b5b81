"""Reads a static CNN's layer structure from one traced forward pass, and rejects what S2D cannot split.

The S2D transformation slices every feature map along channels into stages. That is exact only when
everything in `forward_features` is a dense or depthwise Conv2d, a BatchNorm2d, or a channel-local
op (activation, pooling, dropout, residual addition). Forward hooks on every module record each
layer's input/output shapes in execution order; layers are grouped by feature-map size into the
"layer groups" that share split points (S2DNAS, Yuan et al. ECCV 2020, the split transformation).
A channel-local op that changes the map size (a max-pool, a strided depthwise conv) passes its
input's channel partition through unchanged, so it ties the two sizes into one layer group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynlab.evaluation.outputs import evaluating
from dynlab.nn.dynamic import WeightNetConv

SUPPORTED_BACKBONES = (
    "cifar_resnet20/32/44/56/110, cifar_vgg16_bn, cifar_mobilenetv2, cifar_repvgg_a0/b0 (with "
    "conv=plain|acnet|repvgg, act=relu|relu6|frelu), and plain timm ResNets (resnet18, resnet34, "
    "resnet50)"
)
# Leaf modules that act on every channel separately: a stage's channel slice passes through as is.
CHANNEL_LOCAL: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
)

# Blocks refused by name, with the reason (the talk's other blocks split: ACNet's and RepVGG's
# branches are convs and BNs, FReLU's funnel a depthwise conv + BN, all staged like any other).
REFUSED_BLOCKS: dict[type[nn.Module], str] = {
    WeightNetConv: (
        "is WeightNet (conv=weightnet): its kernels are generated from the pooled input of ALL "
        "channels, so a stage cannot compute its slice from its own and earlier stages' channels; "
        "S2DNAS takes conv=plain|acnet|repvgg with act=relu|frelu"
    ),
}

Size = tuple[int, int]


class UnsupportedBackboneError(ValueError):
    """A backbone whose `forward_features` the S2D transformation cannot split into stages."""


@dataclass(frozen=True)
class ConvLayer:
    """A Conv2d of `forward_features`: channel counts, kind, and the layer groups of its maps."""

    name: str
    in_channels: int
    out_channels: int
    depthwise: bool
    reads_image: bool  # its input is the network input, which every stage reads whole
    in_group: int
    out_group: int
    # the multi-branch block (ACNet, RepVGG) whose branch this conv is, "" if none: its branches
    # must get one plan, so that they still merge into one conv per stage at deploy
    block: str = ""


@dataclass(frozen=True)
class NormLayer:
    """A BatchNorm2d of `forward_features` and the layer group of its feature map."""

    name: str
    channels: int
    group: int


@dataclass(frozen=True)
class BackboneLayout:
    """Everything the transformation needs to know about a backbone, in forward order."""

    backbone: str
    convs: tuple[ConvLayer, ...]
    norms: tuple[NormLayer, ...]
    group_sizes: tuple[tuple[Size, ...], ...]  # the feature-map sizes of each layer group
    out_channels: int  # of the last feature map (the input of the classifier)
    out_group: int

    @property
    def num_layer_groups(self) -> int:
        return len(self.group_sizes)


@dataclass
class _Call:
    """One leaf module's forward during the trace."""

    name: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    reads_image: bool


def analyse_backbone(
    net: nn.Module, input_size: tuple[int, int, int], backbone: str
) -> BackboneLayout:
    """Trace `net.forward_features` once on a zero image of `input_size` (C, H, W) and describe it.

    Raises UnsupportedBackboneError naming the backbone and the offending module for anything the
    transformation cannot split: other leaf modules (Linear, attention, LayerNorm, squeeze-and-
    excitation gates...), grouped convs that are not depthwise, modules applied twice.
    """
    if not hasattr(net, "forward_features") or not hasattr(net, "get_classifier"):
        raise UnsupportedBackboneError(
            f"{backbone}: S2DNAS needs a timm-style model with forward_features and "
            f"get_classifier. Backbones that work: {SUPPORTED_BACKBONES}."
        )
    for name, module in net.named_modules():
        if type(module) in REFUSED_BLOCKS:
            raise UnsupportedBackboneError(
                f"{backbone}: module '{name}' {REFUSED_BLOCKS[type(module)]}."
            )
    calls, out_shape = _trace(net, input_size)
    for call in calls:  # every layer's kind first: the clearest reason to reject a backbone
        _check_kind(call, backbone)
    for call in calls:
        _check_shape(call, backbone)
    if len(out_shape) != 4:
        raise UnsupportedBackboneError(f"{backbone}: forward_features must return a [B,C,H,W] map")
    conv_names = [call.name for call in calls if isinstance(call.module, nn.Conv2d)]
    if len(set(conv_names)) != len(conv_names):
        twice = next(name for name in conv_names if conv_names.count(name) > 1)
        raise UnsupportedBackboneError(
            f"{backbone}: conv '{twice}' is applied more than once in forward_features; S2DNAS "
            f"keeps one input per stage for each conv. Backbones that work: {SUPPORTED_BACKBONES}."
        )
    groups = _SizeGroups()
    for call in calls:  # sizes in forward order, so layer groups are numbered input to output
        if not call.reads_image:
            groups.add(_size(call.in_shape))
        groups.add(_size(call.out_shape))
        if not isinstance(call.module, nn.Conv2d) or _is_depthwise(call.module):
            groups.tie(_size(call.in_shape), _size(call.out_shape))  # one partition in and out
    convs, norms = [], []
    for call in calls:
        if isinstance(call.module, nn.Conv2d):
            convs.append(
                ConvLayer(
                    name=call.name,
                    in_channels=call.module.in_channels,
                    out_channels=call.module.out_channels,
                    depthwise=_is_depthwise(call.module),
                    reads_image=call.reads_image,
                    in_group=-1 if call.reads_image else groups.index(_size(call.in_shape)),
                    out_group=groups.index(_size(call.out_shape)),
                    block=_enclosing_block(net, call.name),
                )
            )
        elif isinstance(call.module, nn.BatchNorm2d):
            norms.append(
                NormLayer(call.name, call.module.num_features, groups.index(_size(call.out_shape)))
            )
    if not convs:
        raise UnsupportedBackboneError(f"{backbone}: forward_features has no Conv2d to split")
    if not groups.known(_size(out_shape)):
        raise UnsupportedBackboneError(
            f"{backbone}: the last feature map ({out_shape[-2]}x{out_shape[-1]}) is not produced "
            "by the module layers S2DNAS traces; size changes must go through nn modules"
        )
    return BackboneLayout(
        backbone=backbone,
        convs=tuple(convs),
        norms=tuple(norms),
        group_sizes=groups.members(),
        out_channels=out_shape[1],
        out_group=groups.index(_size(out_shape)),
    )


def _trace(net: nn.Module, input_size: tuple[int, int, int]) -> tuple[list[_Call], tuple[int, ...]]:
    """Every leaf module call of one `forward_features`, in execution order (eval mode, no grad),
    and the shape of its output."""
    image = torch.zeros(1, *input_size)
    calls: list[_Call] = []
    handles = []

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not list(module.children()):
                first = inputs[0] if inputs else None
                calls.append(
                    _Call(
                        name=name,
                        module=module,
                        in_shape=tuple(first.shape) if isinstance(first, Tensor) else (),
                        out_shape=tuple(output.shape) if isinstance(output, Tensor) else (),
                        reads_image=first is image,
                    )
                )

        return record

    for name, module in net.named_modules():
        handles.append(module.register_forward_hook(hook(name)))
    try:
        with evaluating(net):
            out = net.forward_features(image)
    finally:
        for handle in handles:
            handle.remove()
    return calls, tuple(out.shape) if isinstance(out, Tensor) else ()


def _check_kind(call: _Call, backbone: str) -> None:
    """Raise UnsupportedBackboneError for a layer the transformation cannot slice by channels."""
    module, kind = call.module, type(call.module).__name__
    where = f"{backbone}: module '{call.name}' ({kind}) in forward_features"
    works = f"Backbones that work: {SUPPORTED_BACKBONES}."
    if type(module) is nn.Conv2d:
        if module.groups != 1 and not _is_depthwise(module):
            raise UnsupportedBackboneError(
                f"{where} is a grouped conv (groups={module.groups}) that is not depthwise; S2DNAS "
                f"splits dense and depthwise convs only. {works}"
            )
        if module.padding_mode != "zeros":
            raise UnsupportedBackboneError(
                f"{where} pads with '{module.padding_mode}'; only zero padding is supported. {works}"
            )
    elif type(module) is nn.BatchNorm2d:
        if module.momentum is None:
            raise UnsupportedBackboneError(
                f"{where} uses a cumulative average (momentum=None), which per-stage updates would "
                f"miscount; set a momentum. {works}"
            )
    elif type(module) not in CHANNEL_LOCAL:
        raise UnsupportedBackboneError(
            f"{where} is not supported: the S2D transformation needs every layer to be a dense or "
            "depthwise Conv2d, a BatchNorm2d or a channel-local activation/pooling/dropout (no "
            f"Linear, attention, LayerNorm/GroupNorm or squeeze-and-excitation gates). {works}"
        )


def _check_shape(call: _Call, backbone: str) -> None:
    """Raise UnsupportedBackboneError for a layer that does not map feature maps to feature maps."""
    if len(call.in_shape) != 4 or len(call.out_shape) != 4:
        raise UnsupportedBackboneError(
            f"{backbone}: module '{call.name}' ({type(call.module).__name__}) maps {call.in_shape} "
            f"to {call.out_shape}; S2DNAS needs [B,C,H,W] feature maps throughout forward_features. "
            f"Backbones that work: {SUPPORTED_BACKBONES}."
        )


def _enclosing_block(net: nn.Module, name: str) -> str:
    """The name of the multi-branch block (a module with `branches()`) holding conv `name`."""
    parent = name.rpartition(".")[0]
    return parent if parent and hasattr(net.get_submodule(parent), "branches") else ""


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _size(shape: tuple[int, ...]) -> Size:
    return (shape[-2], shape[-1])


class _SizeGroups:
    """Union-find over feature-map sizes; groups are numbered by first appearance."""

    def __init__(self) -> None:
        self._parent: dict[Size, Size] = {}
        self._order: list[Size] = []

    def add(self, size: Size) -> None:
        if size not in self._parent:
            self._parent[size] = size
            self._order.append(size)

    def _root(self, size: Size) -> Size:
        self.add(size)
        while self._parent[size] != size:
            size = self._parent[size]
        return size

    def tie(self, a: Size, b: Size) -> None:
        root_a, root_b = self._root(a), self._root(b)
        if root_a != root_b:
            self._parent[root_b] = root_a

    def known(self, size: Size) -> bool:
        return size in self._parent

    def _roots(self) -> list[Size]:
        return list(dict.fromkeys(self._root(s) for s in self._order))

    def index(self, size: Size) -> int:
        return self._roots().index(self._root(size))

    def members(self) -> tuple[tuple[Size, ...], ...]:
        return tuple(tuple(s for s in self._order if self._root(s) == r) for r in self._roots())
