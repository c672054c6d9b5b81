"""MetaPruning's PruningNet, whose conv weights are generated for any channel configuration, and
the plain pruned network a configuration becomes.

PruningNet, as the official code builds it (liuzechun/MetaPruning, mobilenetv2/training/
mobilenet_v2.py and resnet/training/resnet.py): every conv's weight is the output of a two-layer
fully connected generator (Linear, ReLU, Linear) at the layer's largest shape, cropped to the
leading output and input channels the configuration keeps. A block's generators all read the
block's scale code [hidden scale, input scale, output scale]; the stem's reads its output scale,
MobileNetV2's last conv its input scale. BatchNorm is affine-free, one per grid scale at each BN
position, picked by the scale id that sets its width. The classifier is an ordinary layer over
the unpruned last width. Generators have 32 hidden units (64 in MobileNetV2's blocks) and
PyTorch's default init, as the official code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynlab.backbones._base import CifarClassifier, init_weights
from dynlab.backbones.metapruning.space import BlockSpec, Space

ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6}


def activation(name: str | None) -> nn.Module:
    return ACTS[name]() if name else nn.Identity()


class GeneratedConv(nn.Module):
    """A conv whose weight a two-layer FC generates from a scale code, at `max_out` x `max_in`
    and cropped to the leading channels (official `fc11`/`fc12`, `.view(...)[:oup, :inp]`)."""

    def __init__(
        self,
        code: int,
        hidden: int,
        max_out: int,
        max_in: int,
        kernel: int,
        stride: int = 1,
        depthwise: bool = False,
    ) -> None:
        super().__init__()
        self.shape = (max_out, 1 if depthwise else max_in, kernel, kernel)
        self.stride, self.depthwise = stride, depthwise
        self.fc1 = nn.Linear(code, hidden)
        self.fc2 = nn.Linear(hidden, max_out * self.shape[1] * kernel * kernel)

    def weight(self, code: Tensor, out: int, inp: int) -> Tensor:
        """The conv weight for `out` output and `inp` input channels."""
        w = self.fc2(F.relu(self.fc1(code))).view(self.shape)
        return w[:out] if self.depthwise else w[:out, :inp]

    def forward(self, x: Tensor, code: Tensor, out: int, inp: int) -> Tensor:
        k = self.shape[-1]
        groups = out if self.depthwise else 1
        return F.conv2d(x, self.weight(code, out, inp), None, self.stride, k // 2, 1, groups)


class BNBank(nn.Module):
    """One affine-free BatchNorm per grid scale (official `nn.ModuleList` of 31
    `BatchNorm2d(c, affine=False)`), picked by scale id."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(w, affine=False) for w in widths)

    def forward(self, x: Tensor, scale_id: int) -> Tensor:
        return self.bns[scale_id](x)


class PruningBlock(nn.Module):
    """One block of the PruningNet: its generated convs, a BN bank after each, the shortcut."""

    def __init__(self, spec: BlockSpec, scales: Sequence[float]) -> None:
        super().__init__()
        self.spec = spec
        base = {"in": spec.base_in, "mid": spec.base_mid, "out": spec.base_out}
        self.convs = nn.ModuleList(
            GeneratedConv(
                3, spec.hidden, base[c.cout], base[c.cin], c.kernel, c.stride, c.depthwise
            )
            for c in spec.convs
        )
        self.bns = nn.ModuleList(
            BNBank([int(base[c.cout] * s) for s in scales]) for c in spec.convs
        )
        self.acts = nn.ModuleList(activation(c.act) for c in spec.convs)
        if spec.shortcut == "projection":
            self.proj = GeneratedConv(3, spec.hidden, spec.base_out, spec.base_in, 1, spec.stride)
            self.proj_bn = BNBank([int(spec.base_out * s) for s in scales])
        self.post_act = activation(spec.post_act)

    def forward(
        self, x: Tensor, code: Tensor, widths: dict[str, int], ids: dict[str, int]
    ) -> Tensor:
        y = x
        for conv_spec, conv, bn, act in zip(
            self.spec.convs, self.convs, self.bns, self.acts, strict=True
        ):
            y = act(
                bn(
                    conv(y, code, widths[conv_spec.cout], widths[conv_spec.cin]),
                    ids[conv_spec.cout],
                )
            )
        if self.spec.shortcut == "projection":
            y = y + self.proj_bn(self.proj(x, code, widths["out"], widths["in"]), ids["out"])
        elif self.spec.shortcut == "identity":
            y = y + x
        return self.post_act(y)


class PruningNet(CifarClassifier):
    """The PruningNet of a channel space: `set_path(genes)` picks the configuration `forward`
    runs (its scale ids); `child(genes)` is that configuration as a plain network carrying the
    generated weights and the BN statistics, `standalone(genes)` a fresh one to retrain."""

    def __init__(
        self,
        space: Space,
        num_classes: int = 10,
        drop_rate: float = 0.0,
        in_chans: int | None = None,
    ) -> None:
        if in_chans is not None:  # timm's builder passes the image channels
            space = space._replace(in_chans=int(in_chans))
        problem = space.grid_problem()
        if problem:
            raise ValueError(f"MetaPruning space: {problem}")
        final = space.head_width or space.blocks[-1].base_out
        super().__init__(final, num_classes, drop_rate)
        self.space, self.drop_rate = space, drop_rate
        scales = space.scales
        self.stem = GeneratedConv(
            1, 32, space.stem_width, space.in_chans, space.stem_kernel, space.stem_stride
        )
        self.stem_bn = BNBank([int(space.stem_width * s) for s in scales])
        self.stem_act = activation(space.stem_act)
        self.blocks = nn.ModuleList(PruningBlock(b, scales) for b in space.blocks)
        if space.head_width:  # official: its BN picked by the input's scale id, all 1280 wide
            self.head_conv = GeneratedConv(1, 32, space.head_width, space.blocks[-1].base_out, 1)
            self.head_bn = BNBank([space.head_width] * len(scales))
        self._path: tuple[int, ...] = (len(scales) - 1,) * space.num_genes  # the full network

    # --- the configuration forward runs -------------------------------------------------------
    def active(self) -> tuple[int, ...]:
        return self._path

    def set_path(self, genes: Sequence[int]) -> None:
        """Run the configuration `genes` (scale ids) from now on; ValueError if none of the space."""
        self._path = self._checked(genes)

    def _checked(self, genes: Sequence[int]) -> tuple[int, ...]:
        problem = self.space.problem(genes)
        if problem:
            raise ValueError(f"MetaPruning configuration: {problem}")
        return tuple(int(g) for g in genes)

    def forward_features(self, x: Tensor) -> Tensor:
        s, genes = self.space, self._path
        scale = lambda gene: s.scales[s.scale_id(gene, genes)]  # noqa: E731
        stem_out = s.width(s.stem_width, s.stem_gene, genes)
        code = x.new_tensor([scale(s.stem_gene)])
        x = self.stem(x, code, stem_out, s.in_chans)
        x = self.stem_act(self.stem_bn(x, s.scale_id(s.stem_gene, genes)))
        if s.stem_pool:
            x = F.max_pool2d(x, 3, 2, 1)
        for spec, block in zip(s.blocks, self.blocks, strict=True):
            genes_of = {"in": spec.in_gene, "mid": spec.mid_gene, "out": spec.out_gene}
            bases = {"in": spec.base_in, "mid": spec.base_mid, "out": spec.base_out}
            widths = {k: s.width(bases[k], g, genes) for k, g in genes_of.items()}
            ids = {k: s.scale_id(g, genes) for k, g in genes_of.items()}
            code = x.new_tensor([scale(spec.mid_gene), scale(spec.in_gene), scale(spec.out_gene)])
            x = block(x, code, widths, ids)
        if s.head_width:
            last = s.blocks[-1]
            code = x.new_tensor([scale(last.out_gene)])
            width = s.width(last.base_out, last.out_gene, genes)
            x = self.head_conv(x, code, s.head_width, width)
            x = F.relu6(self.head_bn(x, s.scale_id(last.out_gene, genes)))
        return x

    # --- the pruned networks ------------------------------------------------------------------
    def plan(self, genes: Sequence[int]) -> dict[str, Any]:
        """The widths of configuration `genes`: what a `PrunedNet` is built from (JSON-able)."""
        s, genes = self.space, self._checked(genes)
        blocks = [
            [
                s.width(b.base_in, b.in_gene, genes),
                s.width(b.base_mid, b.mid_gene, genes),
                s.width(b.base_out, b.out_gene, genes),
            ]
            for b in s.blocks
        ]
        return {"stem": s.width(s.stem_width, s.stem_gene, genes), "blocks": blocks}

    def standalone(self, genes: Sequence[int]) -> PrunedNet:
        """A fresh, untrained pruned network of `genes` with affine BN (to retrain)."""
        return PrunedNet(self.space, self.plan(genes), self.num_classes, self.drop_rate)

    @torch.no_grad()
    def child(self, genes: Sequence[int]) -> PrunedNet:
        """The pruned network of `genes` (affine-free BN) carrying the generated weights and the
        BN statistics of the scales it uses: in eval mode it computes what the PruningNet set to
        `genes` does."""
        genes = self._checked(genes)
        device = self.head.fc.weight.device
        with torch.device(device):
            net = PrunedNet(self.space, self.plan(genes), self.num_classes, self.drop_rate, False)
        saved, self._path = self._path, genes
        try:
            _copy_generated(self, net, genes)
        finally:
            self._path = saved
        net.head.load_state_dict(self.head.state_dict())
        return net.train(self.training)

    def signature(self) -> dict[str, Any]:
        return {**self.space.signature(), "num_classes": self.num_classes}


def _copy_generated(src: PruningNet, dst: PrunedNet, genes: tuple[int, ...]) -> None:
    """Write into `dst` the weights `src` generates for `genes` and its BN statistics."""
    s = src.space
    scale = lambda gene: s.scales[s.scale_id(gene, genes)]  # noqa: E731

    def put(layer: ConvBN, gen: GeneratedConv, bank: BNBank, code: list[float], gene: Any) -> None:
        """`layer`'s conv weight from `gen` at `code`, its BN statistics from `bank` at the scale
        id of `gene` (the gene that sets its width)."""
        conv, bn = layer.conv, layer.bn
        code_t = torch.tensor(code, device=conv.weight.device)
        conv.weight.copy_(gen.weight(code_t, conv.out_channels, conv.in_channels))
        source = bank.bns[s.scale_id(gene, genes)]
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            getattr(bn, name).copy_(getattr(source, name))

    put(dst.stem, src.stem, src.stem_bn, [scale(s.stem_gene)], s.stem_gene)
    for spec, pruning, plain in zip(s.blocks, src.blocks, dst.blocks, strict=True):
        genes_of = {"in": spec.in_gene, "mid": spec.mid_gene, "out": spec.out_gene}
        code = [scale(spec.mid_gene), scale(spec.in_gene), scale(spec.out_gene)]
        for c, gen, bank, layer in zip(
            spec.convs, pruning.convs, pruning.bns, plain.layers, strict=True
        ):
            put(layer, gen, bank, code, genes_of[c.cout])
        if spec.shortcut == "projection":
            put(plain.proj, pruning.proj, pruning.proj_bn, code, spec.out_gene)
    if s.head_width:
        gene = s.blocks[-1].out_gene
        put(dst.head_conv, src.head_conv, src.head_bn, [scale(gene)], gene)


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm + activation."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        depthwise: bool = False,
        act: str | None = "relu",
        affine: bool = True,
    ) -> None:
        super().__init__()
        groups = cout if depthwise else 1
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, affine=affine)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class PlainBlock(nn.Module):
    """A block of a pruned network at the widths (in, mid, out) its configuration gives."""

    def __init__(self, spec: BlockSpec, widths: Sequence[int], affine: bool) -> None:
        super().__init__()
        w = dict(zip(("in", "mid", "out"), (int(v) for v in widths), strict=True))
        self.layers = nn.ModuleList(
            ConvBN(w[c.cin], w[c.cout], c.kernel, c.stride, c.depthwise, c.act, affine)
            for c in spec.convs
        )
        self.shortcut = spec.shortcut
        if spec.shortcut == "projection":
            self.proj = ConvBN(w["in"], w["out"], 1, spec.stride, act=None, affine=affine)
        self.post_act = activation(spec.post_act)

    def forward(self, x: Tensor) -> Tensor:
        y = x
        for layer in self.layers:
            y = layer(y)
        if self.shortcut == "projection":
            y = y + self.proj(x)
        elif self.shortcut == "identity":
            y = y + x
        return self.post_act(y)


class PrunedNet(CifarClassifier):
    """A pruned network of plain layers at the widths `plan` gives (`PruningNet.plan`): what
    MetaPruning retrains from scratch and deploys, and a uniform-width baseline at one scale."""

    def __init__(
        self,
        space: Space,
        plan: dict[str, Any],
        num_classes: int = 10,
        drop_rate: float = 0.0,
        affine: bool = True,
    ) -> None:
        final = space.head_width or int(plan["blocks"][-1][2])
        super().__init__(final, num_classes, drop_rate)
        self.config = {"plan": plan, "num_classes": num_classes}
        self.stem = ConvBN(
            space.in_chans,
            int(plan["stem"]),
            space.stem_kernel,
            space.stem_stride,
            act=space.stem_act,
            affine=affine,
        )
        self.stem_pool = nn.MaxPool2d(3, 2, 1) if space.stem_pool else nn.Identity()
        self.blocks = nn.ModuleList(
            PlainBlock(b, w, affine) for b, w in zip(space.blocks, plan["blocks"], strict=True)
        )
        if space.head_width:
            self.head_conv = ConvBN(
                int(plan["blocks"][-1][2]), space.head_width, 1, act="relu6", affine=affine
            )
        if affine:  # an affine-free net is a child: its weights are written over
            self.apply(init_weights)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem_pool(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head_conv(x) if hasattr(self, "head_conv") else x
