"""Reads a static CNN's layer structure from one traced forward pass, and rejects what S2D cannot split.

The S2D transformation slices every feature map along channels into stages. That is exact only when
everything in `forward_features` is a dense or depthwise Conv2d, a BatchNorm2d, or a channel-local
op (activation, pooling, dropout, residual addition). Forward hooks on every module record each
layer's input/output shapes in execution order, and the trace follows which channel partition every
tensor carries. Layers that share a partition form a "layer group" with one set of split points
(S2DNAS, Yuan et al. ECCV 2020, the split transformation: layers with the same feature-map size
share them):

- a dense conv's output takes the partition of its output size: every map size a dense conv
  produces is its own layer group, numbered input to output;
- a BatchNorm, a channel-local module or a depthwise conv passes its input's partition to its
  output, even when it changes the map size (a max-pool, a strided depthwise conv): the channels
  it outputs are still cut where the layer that produced its input cut them;
- a conv's input partition (`in_group`) is the one of the tensor it actually reads, not of that
  tensor's map size;
- tensor functions outside modules (residual additions, FReLU's max, ACNet/RepVGG branch sums,
  spatial crops) give their output the partition of their tensor inputs, and an addition of maps
  with two different partitions ties them into one layer group (its stages must add matching
  slices): timm's ResNets add the stem's max-pooled map to their first stage, so the stem's size
  and the first stage's size are one group.
A tensor with no traced origin falls back to the partition of its map size.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from dynlab.evaluation.outputs import evaluating
from dynlab.nn.dynamic import WeightNetConv, WeightNetDWConv

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
        "S2DNAS takes conv=plain|acnet|repvgg with act=relu|frelu|frelu_light"
    ),
    WeightNetDWConv: (
        "is WeightNet's depthwise form: its kernels are generated from the pooled input of ALL "
        "channels, so a stage cannot compute its slice from its own and earlier stages' channels; "
        "S2DNAS takes conv=plain|acnet|repvgg with act=relu|frelu|frelu_light"
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
    # per layer group, the map sizes its dense convs produce (more than one where a residual
    # addition ties them); maps that only channel-local ops produce carry an inherited group
    group_sizes: tuple[tuple[Size, ...], ...]
    out_channels: int  # of the last feature map (the input of the classifier)
    out_group: int

    @property
    def num_layer_groups(self) -> int:
        return len(self.group_sizes)


@dataclass
class _Call:
    """One leaf module's forward during the trace, with the partition nodes of its input and
    output (`_Partitions`; -1 where it has no feature map)."""

    name: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_node: int
    out_node: int


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
    works = f"Backbones that work: {SUPPORTED_BACKBONES}."
    partitions = _Partitions()
    calls, out_shape, out_node = _trace(net, input_size, partitions)
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
            f"keeps one input per stage for each conv. {works}"
        )
    if partitions.image_tied():
        raise UnsupportedBackboneError(
            f"{backbone}: forward_features adds the network input (or a map computed from it "
            "without a conv) to a feature map; every stage reads the input whole, so the sum "
            f"cannot be split into stages. {works}"
        )
    convs, norms = [], []
    for call in calls:
        reads_image = partitions.is_image(call.in_node)
        per_channel = isinstance(call.module, nn.BatchNorm2d) or (
            isinstance(call.module, nn.Conv2d) and _is_depthwise(call.module)
        )
        if reads_image and per_channel:
            raise UnsupportedBackboneError(
                f"{backbone}: module '{call.name}' ({type(call.module).__name__}) works on the "
                "network input channel by channel, but every stage reads the input whole; "
                f"S2DNAS needs a dense conv to read it first. {works}"
            )
        if isinstance(call.module, nn.Conv2d):
            depthwise = _is_depthwise(call.module)
            in_group = -1 if reads_image else partitions.index(call.in_node)
            convs.append(
                ConvLayer(
                    name=call.name,
                    in_channels=call.module.in_channels,
                    out_channels=call.module.out_channels,
                    depthwise=depthwise,
                    reads_image=reads_image,
                    in_group=in_group,
                    out_group=in_group if depthwise else partitions.index(call.out_node),
                    block=_enclosing_block(net, call.name),
                )
            )
        elif isinstance(call.module, nn.BatchNorm2d):
            norms.append(
                NormLayer(call.name, call.module.num_features, partitions.index(call.in_node))
            )
    if not convs or partitions.is_image(out_node):
        raise UnsupportedBackboneError(f"{backbone}: forward_features has no Conv2d to split")
    return BackboneLayout(
        backbone=backbone,
        convs=tuple(convs),
        norms=tuple(norms),
        group_sizes=partitions.group_sizes(),
        out_channels=out_shape[1],
        out_group=partitions.index(out_node),
    )


def _trace(
    net: nn.Module, input_size: tuple[int, int, int], partitions: _Partitions
) -> tuple[list[_Call], tuple[int, ...], int]:
    """Every leaf module call of one `forward_features`, in execution order (eval mode, no grad),
    the shape of its output and that output's partition node; `partitions` records the nodes and
    their ties on the way."""
    image = torch.zeros(1, *input_size)
    carried = _Carried(partitions)
    carried.set(image, _Partitions.IMAGE)
    calls: list[_Call] = []
    handles = []

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if list(module.children()):
                return
            first = inputs[0] if inputs else None
            in_node = carried.node(first)
            out_node = in_node  # BN, channel-local, depthwise: the input's partition passes on
            if isinstance(module, nn.Conv2d) and not _is_depthwise(module):
                out_node = partitions.of_size(_size(output.shape)) if _is_map(output) else -1
            if isinstance(output, Tensor) and out_node >= 0:
                carried.set(output, out_node)
            calls.append(
                _Call(
                    name=name,
                    module=module,
                    in_shape=tuple(first.shape) if isinstance(first, Tensor) else (),
                    out_shape=tuple(output.shape) if isinstance(output, Tensor) else (),
                    in_node=in_node,
                    out_node=out_node,
                )
            )

        return record

    for name, module in net.named_modules():
        handles.append(module.register_forward_hook(hook(name)))
    try:
        with evaluating(net), carried:
            out = net.forward_features(image)
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(out, Tensor):
        return calls, (), -1
    return calls, tuple(out.shape), carried.node(out)


class _Partitions:
    """Union-find over channel partitions. Node 0 is the network input, which every stage reads
    whole; every other node is the partition of one map size produced by a dense conv (or of a
    size whose tensor has no traced origin), numbered in forward order. The layer groups are the
    classes of nodes other than the input's, numbered by their first node."""

    IMAGE = 0

    def __init__(self) -> None:
        self._parent = [self.IMAGE]
        self._by_size: dict[Size, int] = {}

    def of_size(self, size: Size) -> int:
        if size not in self._by_size:
            self._by_size[size] = len(self._parent)
            self._parent.append(len(self._parent))
        return self._by_size[size]

    def root(self, node: int) -> int:
        while self._parent[node] != node:
            node = self._parent[node]
        return node

    def tie(self, a: int, b: int) -> None:
        root_a, root_b = sorted((self.root(a), self.root(b)))
        self._parent[root_b] = root_a  # the earlier node stays the root: numbering is kept

    def is_image(self, node: int) -> bool:
        return node >= 0 and self.root(node) == self.IMAGE

    def image_tied(self) -> bool:
        return any(self.is_image(node) for node in range(1, len(self._parent)))

    def _roots(self) -> list[int]:
        roots = (self.root(node) for node in range(1, len(self._parent)))
        return list(dict.fromkeys(roots))

    def index(self, node: int) -> int:
        return self._roots().index(self.root(node))

    def group_sizes(self) -> tuple[tuple[Size, ...], ...]:
        """The map sizes whose partitions make up each layer group."""
        return tuple(
            tuple(size for size, node in self._by_size.items() if self.root(node) == root)
            for root in self._roots()
        )


class _Carried(TorchFunctionMode):
    """The partition node each tensor carries, by tensor identity (the tensors are kept alive, so
    an id is never reused). As a torch function mode it also follows the tensor functions called
    outside the hooked modules: their output carries their tensor inputs' partition, and inputs
    carrying different partitions (a residual addition of two layer groups' maps) tie them."""

    def __init__(self, partitions: _Partitions) -> None:
        super().__init__()
        self.partitions = partitions
        self._nodes: dict[int, tuple[Tensor, int]] = {}

    def set(self, tensor: Tensor, node: int) -> None:
        self._nodes[id(tensor)] = (tensor, node)

    def node(self, tensor: object) -> int:
        """The partition `tensor` carries; one without a traced origin takes its map size's."""
        if not isinstance(tensor, Tensor):
            return -1
        kept = self._nodes.get(id(tensor))
        if kept is not None and kept[0] is tensor:
            return kept[1]
        return self.partitions.of_size(_size(tensor.shape)) if _is_map(tensor) else -1

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Collection[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        nodes = []
        for tensor in _tensors((args, kwargs)):
            kept = self._nodes.get(id(tensor))
            if kept is not None and kept[0] is tensor:  # parameters and buffers carry none
                nodes.append(kept[1])
        if nodes:
            for other in nodes[1:]:
                self.partitions.tie(nodes[0], other)
            for tensor in _tensors(out):
                self.set(tensor, nodes[0])
        return out


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


def _is_map(tensor: object) -> bool:
    return isinstance(tensor, Tensor) and tensor.dim() == 4


def _tensors(tree: object) -> list[Tensor]:
    """The tensors in nested tuples, lists and dicts (a torch function's arguments or result)."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, tuple | list):
        return [t for item in tree for t in _tensors(item)]
    if isinstance(tree, dict):
        return [t for item in tree.values() for t in _tensors(item)]
    return []
