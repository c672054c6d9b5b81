"""MetaPruning's channel spaces (Liu et al., "MetaPruning: Meta Learning for Automatic Neural
Network Channel Pruning", ICCV 2019; official code liuzechun/MetaPruning): a network as a stem,
blocks of convs and a head, each width a base width times one scale of a grid, and the genes that
choose them: one scale id per prunable stage output (tied across the stage, as the residual adds
need) and one per block's hidden width. An unpruned width takes the grid's last scale, 1.0, as the
official code's id -1 does."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

# The official grid: (10 + 3 i) / 100 for i = 0..30, 0.10 to 1.00 (mobilenetv2/training/
# mobilenet_v2.py l.11-17, resnet/training/resnet.py l.8-10): a layer can only shrink.
SCALES: tuple[float, ...] = tuple((10 + 3 * i) / 100 for i in range(31))
FULL = -1  # the id of an unpruned width (scale 1.0)


class ConvSpec(NamedTuple):
    """One conv of a block: which of the block's widths ("in", "mid", "out") it reads and writes,
    its kernel, stride and groups (depthwise: one group per channel), and the activation after
    its BatchNorm ("relu", "relu6" or None)."""

    cin: str
    cout: str
    kernel: int
    stride: int = 1
    depthwise: bool = False
    act: str | None = "relu"


class BlockSpec(NamedTuple):
    """One block: its convs in order, its base widths, the genes that scale them (None: fixed at
    1.0), the shortcut ("identity", "projection" with its stride, or "none") and the activation
    after the add."""

    convs: tuple[ConvSpec, ...]
    base_in: int
    base_mid: int
    base_out: int
    in_gene: int | None
    mid_gene: int | None
    out_gene: int | None
    shortcut: str = "none"
    stride: int = 1
    post_act: str | None = None
    hidden: int = 32  # the weight generators' hidden width


class Space(NamedTuple):
    """A network's channel space: the stem conv (its output scaled by `stem_gene`), the blocks,
    the head conv (None: the last block's output is pooled; else `head_width` wide, its input
    from the last block), how many stage genes and block genes there are, and the grid."""

    family: str  # "resnet" | "mobilenetv2": what the names of its layers follow
    in_chans: int
    stem_width: int
    stem_kernel: int
    stem_stride: int
    stem_pool: bool  # a 3x3/2 max pool after the stem (ImageNet ResNet)
    stem_act: str
    stem_gene: int | None
    blocks: tuple[BlockSpec, ...]
    head_width: int | None  # MobileNetV2's last 1x1 conv (never pruned), None for ResNet
    stage_genes: int
    scales: tuple[float, ...] = SCALES

    @property
    def num_genes(self) -> int:
        return self.stage_genes + len(self.blocks)

    def gene_choices(self) -> list[int]:
        return [len(self.scales)] * self.num_genes

    def width(self, base: int, gene: int | None, genes: Sequence[int]) -> int:
        """The width `base` scaled by the scale gene `gene` of `genes` (None: unpruned), truncated
        as the official `int(base * scale)`."""
        scale = self.scales[FULL if gene is None else genes[gene]]
        return int(base * scale)

    def scale_id(self, gene: int | None, genes: Sequence[int]) -> int:
        """The grid index a BatchNorm bank is read at (official `*_bn[scale_id]`)."""
        return len(self.scales) - 1 if gene is None else int(genes[gene])

    def problem(self, genes: Any) -> str | None:
        """Why `genes` is not a candidate of this space (one line), or None."""
        try:
            values = [int(g) for g in genes]
        except (TypeError, ValueError):
            return f"{genes!r} is not a list of scale ids"
        if len(values) != self.num_genes:
            return f"{len(values)} genes for a space of {self.num_genes}"
        bad = [g for g in values if not 0 <= g < len(self.scales)]
        if bad:
            return f"scale ids {bad} outside 0..{len(self.scales) - 1}"
        return None

    def grid_problem(self) -> str | None:
        """One line when the grid's smallest scale leaves some pruned width at zero channels."""
        smallest = min(self.scales)
        bases = [(self.stem_width, "the stem")] if self.stem_gene is not None else []
        for i, b in enumerate(self.blocks):
            bases += [(b.base_mid, f"block {i}'s hidden width")] if b.mid_gene is not None else []
            bases += [(b.base_out, f"block {i}'s output")] if b.out_gene is not None else []
        for base, what in bases:
            if int(base * smallest) < 1:
                return (
                    f"the scale {smallest:g} leaves {what} ({base} channels) with "
                    f"{int(base * smallest)}: every scale must keep at least 1 channel of every "
                    f"pruned width (smallest allowed here {1 / min(b for b, _ in bases):.4f})"
                )
        if any(not 0 < s <= 1 for s in self.scales) or list(self.scales) != sorted(
            set(self.scales)
        ):
            return f"scales must rise strictly within (0, 1], got {list(self.scales)}"
        return None

    def signature(self) -> dict[str, Any]:
        """A JSON-able description of the space, to check checkpoint compatibility."""
        return {
            "family": self.family,
            "in_chans": self.in_chans,
            "stem": [self.stem_width, self.stem_kernel, self.stem_stride, self.stem_pool],
            "blocks": [
                [b.base_in, b.base_mid, b.base_out, b.stride, b.shortcut] for b in self.blocks
            ],
            "head_width": self.head_width,
            "scales": list(self.scales),
        }


def resnet_space(
    widths: Sequence[int],
    repeats: Sequence[int],
    strides: Sequence[int],
    bottleneck: bool,
    stem_width: int,
    imagenet_stem: bool,
    scales: Sequence[float] = SCALES,
) -> Space:
    """A ResNet space as the official resnet/training/resnet.py lays it out: the stem's width and
    every stage's output but the last are genes (the last feeds the shared classifier, never
    pruned: official resnet/training/train.py l.181), every block's hidden width is a gene, and every stage's
    first block has a projection shortcut (stage 1 too, so the stem is free). `widths` are the
    stages' output widths; a bottleneck's hidden width is a quarter of its output (ResNet-50), a
    basic block's equals its output (CIFAR ResNet-20/56)."""
    stage_genes = 1 + len(widths) - 1  # the stem, then every stage but the last
    blocks, cin, b = [], stem_width, 0
    for s, (width, n, stride) in enumerate(zip(widths, repeats, strides, strict=True)):
        out_gene = 1 + s if s < len(widths) - 1 else None
        for j in range(n):
            in_gene = s if j == 0 else out_gene  # the stem's gene (0) or the last stage's
            step = stride if j == 0 else 1
            if bottleneck:  # torchvision v1.5 / official: the stride on the 3x3
                convs = (
                    ConvSpec("in", "mid", 1),
                    ConvSpec("mid", "mid", 3, step),
                    ConvSpec("mid", "out", 1, act=None),
                )
            else:
                convs = (ConvSpec("in", "mid", 3, step), ConvSpec("mid", "out", 3, act=None))
            blocks.append(
                BlockSpec(
                    convs,
                    base_in=cin,
                    base_mid=width // 4 if bottleneck else width,
                    base_out=width,
                    in_gene=in_gene,
                    mid_gene=stage_genes + b,
                    out_gene=out_gene,
                    shortcut="projection" if j == 0 else "identity",
                    stride=step,
                    post_act="relu",
                )
            )
            cin, b = width, b + 1
    return Space(
        "resnet",
        3,
        stem_width,
        7 if imagenet_stem else 3,
        2 if imagenet_stem else 1,
        imagenet_stem,
        "relu",
        0,
        tuple(blocks),
        None,
        stage_genes,
        tuple(scales),
    )


def mobilenetv2_space(
    stem_width: int,
    widths: Sequence[int],
    repeats: Sequence[int],
    strides: Sequence[int],
    expansions: Sequence[int],
    stem_stride: int,
    head_width: int,
    scales: Sequence[float] = SCALES,
) -> Space:
    """A MobileNetV2 space as the official mobilenetv2/training/mobilenet_v2.py lays it out: one
    gene for the stem and one per stage output (tied across the stage), one per block's hidden
    width; every block has its 1x1 expansion conv (block 1's too, t = 1: its hidden width the
    stem's), ReLU6 after the expansion and the depthwise conv, none after the projection; a
    residual where the base widths match at stride 1 inside a stage (official l.167: decided on
    the base widths, so a pruned net never gains a residual its PruningNet lacked; the official
    spaces never have equal widths across a stage boundary); the last 1x1 conv
    (`head_width`) is never pruned."""
    blocks, cin = [], stem_width
    stage_genes = 1 + len(widths)
    b = 0
    for s, (width, n, stride, t) in enumerate(
        zip(widths, repeats, strides, expansions, strict=True)
    ):
        for j in range(n):
            step = stride if j == 0 else 1
            convs = (
                ConvSpec("in", "mid", 1, act="relu6"),
                ConvSpec("mid", "mid", 3, step, depthwise=True, act="relu6"),
                ConvSpec("mid", "out", 1, act=None),
            )
            blocks.append(
                BlockSpec(
                    convs,
                    base_in=cin,
                    base_mid=cin * t,
                    base_out=width,
                    in_gene=s if j == 0 else 1 + s,
                    mid_gene=stage_genes + b,
                    out_gene=1 + s,
                    # within a stage only: there its input and output share one gene
                    shortcut="identity" if cin == width and step == 1 and j > 0 else "none",
                    stride=step,
                    hidden=64,  # official: 64 in the bottlenecks, 32 in the stem and last conv
                )
            )
            cin, b = width, b + 1
    return Space(
        "mobilenetv2",
        3,
        stem_width,
        3,
        stem_stride,
        False,
        "relu6",
        0,
        tuple(blocks),
        head_width,
        stage_genes,
        tuple(scales),
    )
