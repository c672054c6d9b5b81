"""CondenseNet's learned group conv (LGC) and CondenseNetV2's sparse feature reactivation (SFR).

Both are a pre-activation 1x1 conv (BN -> act -> conv) whose dense weight is multiplied by a 0/1
mask that is sparsified during training by `drop()`, then converted to a real group conv for
deployment by `condensed()`. They are the same machinery along different axes, shared here in
`_MaskedGroupConv1x1`:

- LGC (official `utils/layers.py` `LGC`): groups are strided over the OUTPUTS (output o is in group
  o mod G) and each group drops INPUT channels; after the C-1 drops of the schedule every group
  reads in_channels / C inputs.
- SFR (official `utils/layers.py` `SFR`): groups are strided over the INPUTS (the k new features)
  and each group drops OUTPUT channels; after S-1 drops every input group writes out_channels / S
  outputs.

Unlike the official layers, no global training progress is read in `forward`: the caller (the
model's sparsification schedule) calls `drop()` once per stage, so a skipped stage cannot happen
silently (official `_check_drop` drops only once when progress jumps over several stages).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    # official `utils/layers.py` `HS` is x * relu6(x + 3) / 6, which is exactly nn.Hardswish
    "hswish": nn.Hardswish,
}


def _activation(name: str) -> nn.Module:
    """The activation module registered under `name` in ACTIVATIONS."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _check_positive(**values: int) -> None:
    """ValueError unless every value is a positive int."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class _MaskedGroupConv1x1(nn.Module):
    """BN -> act -> 1x1 conv with a per-group 0/1 mask that `drop()` sparsifies in stages.

    `_group_axis` says which weight axis the groups are strided over (0: outputs, as in LGC;
    1: inputs, as in SFR); connections are dropped along the other axis. Every member of a group
    shares one keep-pattern over the drop axis, so the state is a [G, L] boolean "keep" table
    (L = length of the drop axis) expanded to the full [O, I] mask.
    """

    _group_axis: int  # set by subclasses
    _factor_name: str  # "condense_factor" / "sparse_factor", for messages

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int,
        factor: int | None,
        activation: str,
    ) -> None:
        super().__init__()
        factor = groups if factor is None else factor  # official default: factor = groups
        _check_positive(in_channels=in_channels, out_channels=out_channels, groups=groups)
        _check_positive(**{self._factor_name: factor})
        # official asserts: both in and out divisible by G, the drop axis by the factor
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if value % groups:
                raise ValueError(
                    f"{type(self).__name__}: {name}={value} is not divisible by groups={groups}; "
                    f"use groups dividing {value}"
                )
        drop_len = in_channels if self._group_axis == 0 else out_channels
        drop_name = "in_channels" if self._group_axis == 0 else "out_channels"
        if drop_len % factor:
            raise ValueError(
                f"{type(self).__name__}: {drop_name}={drop_len} is not divisible by "
                f"{self._factor_name}={factor} (each group keeps {drop_name} / "
                f"{self._factor_name} of them); use a {self._factor_name} dividing {drop_len}"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.factor, self.activation_name = factor, activation
        self.norm = nn.BatchNorm2d(in_channels)
        self.act = _activation(activation)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.register_buffer("mask", torch.ones(out_channels, in_channels))
        self.register_buffer("drop_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("drop_stage", torch.zeros((), dtype=torch.long))

    # -- the grouping, shared by importance, masks and conversion ------------------------------

    @property
    def _drop_len(self) -> int:
        """Length of the axis connections are dropped along (inputs for LGC, outputs for SFR)."""
        return self.in_channels if self._group_axis == 0 else self.out_channels

    @property
    def _delta(self) -> int:
        """Connections each group drops per stage (official `_dropping(delta)`)."""
        return self._drop_len // self.factor

    def _group_major(self, t: Tensor) -> Tensor:
        """[O, I] -> [members per group, G, L]: entry [j, g, l] is member j*G + g of group g."""
        t = t if self._group_axis == 0 else t.t()
        return t.reshape(-1, self.groups, self._drop_len)

    def _expand(self, keep: Tensor) -> Tensor:
        """[G, L] keep table -> the full [O, I] float mask (member m of the group axis is in
        group m mod G, the official strided grouping)."""
        n_group_axis = self.out_channels if self._group_axis == 0 else self.in_channels
        members = keep[torch.arange(n_group_axis, device=keep.device) % self.groups]
        return (members if self._group_axis == 0 else members.t()).to(self.mask.dtype)

    def keep_table(self) -> Tensor:
        """[G, L] bool: which drop-axis channels each group still connects to."""
        grouped = self._group_major(self.mask) > 0
        keep = grouped[0]
        if not bool((grouped == keep).all()):
            raise ValueError(f"{self._describe()}: mask is not constant within each group")
        return keep

    # -- API -----------------------------------------------------------------------------------

    @property
    def stages(self) -> int:
        """Number of drops of the schedule (factor - 1)."""
        return self.factor - 1

    def _describe(self) -> str:
        return (
            f"{type(self).__name__}({self.in_channels}->{self.out_channels}, groups={self.groups},"
            f" {self._factor_name}={self.factor})"
        )

    @torch.no_grad()
    def drop(self) -> None:
        """One stage: each group drops its `delta` weakest live connections by L1 importance.

        Importance (official `LGC._dropping` / `SFR._dropping`): per group, the sum of |W * mask|
        over the group's members, one score per channel of the drop axis. The official code sorts
        all scores and takes positions [count, count + delta], relying on dropped channels
        (score 0) sorting first; a live channel whose weights are exactly 0 ties with them and can
        make it re-drop a dead one. Here dead channels score +inf, so the `delta` smallest are
        always live ones (stable sort: ties go to the lower channel index).
        """
        stage = int(self.drop_stage)
        if stage >= self.stages:
            raise RuntimeError(
                f"{self._describe()}: all {self.stages} drops already done, nothing left to drop"
            )
        keep = self.keep_table()
        importance = self._group_major((self.conv.weight.detach().flatten(1) * self.mask).abs())
        scores = importance.sum(0).float().masked_fill(~keep, float("inf"))
        weakest = scores.argsort(dim=1, stable=True)[:, : self._delta]
        keep = keep.scatter(1, weakest, False)
        self.mask.copy_(self._expand(keep))
        self.drop_count += self._delta
        self.drop_stage += 1

    def density(self) -> float:
        """Fraction of the dense weights still live."""
        return float(self.mask.float().mean())

    def group_lasso(self) -> Tensor:
        """Official `lasso_loss`: sum over groups and drop-axis channels of the L2 norm of that
        channel's masked weights inside the group (clamped at 1e-6 before the sqrt); zero once
        every drop is done. Not used by the official V2 train.py; opt-in for a caller."""
        weight = self.conv.weight.flatten(1)
        if int(self.drop_stage) >= self.stages:
            # official compares its stage with groups - 1, i.e. with the schedule length when G == C
            return weight.new_zeros(())
        squares = self._group_major((weight * self.mask) ** 2)
        return squares.sum(0).clamp(min=1e-6).sqrt().sum()

    def _check_complete(self) -> Tensor:
        """The [G, L] keep table, after checking the schedule is done and each group keeps L/factor."""
        if int(self.drop_stage) < self.stages:
            raise ValueError(
                f"{self._describe()}: sparsification incomplete: {int(self.drop_stage)} of"
                f" {self.stages} drops"
            )
        keep = self.keep_table()
        kept = keep.sum(1)
        if not bool((kept == self._drop_len // self.factor).all()):
            raise ValueError(
                f"{self._describe()}: each group must keep {self._drop_len // self.factor}"
                f" channels after all drops, got {kept.tolist()}"
            )
        return keep

    def forward(self, x: Tensor) -> Tensor:
        weight = self.conv.weight * self.mask[:, :, None, None].to(self.conv.weight.dtype)
        return F.conv2d(self.act(self.norm(x)), weight)

    def extra_repr(self) -> str:
        return (
            f"{self._factor_name}={self.factor}, activation={self.activation_name!r},"
            f" drops={int(self.drop_stage)}/{self.stages}"
        )


class LearnedGroupConv(_MaskedGroupConv1x1):
    """CondenseNet's LGC: BN -> act -> 1x1 conv masked per group; groups strided over outputs,
    each group drops input channels (official `utils/layers.py` `LGC`)."""

    _group_axis = 0
    _factor_name = "condense_factor"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int,
        condense_factor: int | None = None,
        activation: str = "relu",
    ) -> None:
        super().__init__(in_channels, out_channels, groups, condense_factor, activation)

    @property
    def condense_factor(self) -> int:
        return self.factor

    def condensed(self) -> CondensedLGC:
        """The deploy form: a real group conv over the selected inputs (official `CondensingLGC`)."""
        return CondensedLGC.from_masked(self)


class SparseFeatureReactivation(_MaskedGroupConv1x1):
    """CondenseNetV2's SFR: BN -> act -> 1x1 conv from k new features back to all earlier ones,
    masked per group; groups strided over the inputs, each group drops output channels
    (official `utils/layers.py` `SFR`). Its output is added to the layer's input by the caller."""

    _group_axis = 1
    _factor_name = "sparse_factor"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int,
        sparse_factor: int | None = None,
        activation: str = "relu",
    ) -> None:
        super().__init__(in_channels, out_channels, groups, sparse_factor, activation)

    @property
    def sparse_factor(self) -> int:
        return self.factor

    def reactivate(self, x: Tensor, new: Tensor) -> Tensor:
        """x + SFR(new): the earlier features updated by the new ones (what a network adds)."""
        return x + self(new)

    def condensed(self) -> CondensedSFR:
        """The deploy form: group conv + integer scatter-add (official `CondensingSFR`, minus its
        dense O x O float matrix)."""
        return CondensedSFR.from_masked(self)


def _strided_groups(groups: int, members: int) -> Tensor:
    """[G, members] channel indices of the strided groups: row g is g, g + G, g + 2G, ..."""
    return torch.arange(groups)[:, None] + torch.arange(members)[None, :] * groups


def _copy_norm(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, index: Tensor | None = None) -> None:
    """Copy BN parameters and running stats, selecting (and possibly duplicating) `index`."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(src, name)
        getattr(dst, name).data.copy_(value if index is None else value.index_select(0, index))
    dst.num_batches_tracked.copy_(src.num_batches_tracked)
    dst.eps, dst.momentum = src.eps, src.momentum


class CondensedLGC(nn.Module):
    """Deploy form of LearnedGroupConv: index_select -> BN -> act -> group conv -> shuffle.

    Group g reads its in/C kept inputs (an input kept by several groups is duplicated, with its
    BN stats); the group conv's output block g holds original outputs {g, g+G, ...}, which the
    final channel shuffle (official `ShuffleLayer`) puts back in the original order. Construct
    empty from the shapes (to load a converted state dict) or with `from_masked`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int,
        condense_factor: int | None = None,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        factor = groups if condense_factor is None else condense_factor
        _check_positive(
            in_channels=in_channels,
            out_channels=out_channels,
            groups=groups,
            condense_factor=factor,
        )
        if in_channels % factor or out_channels % groups:
            raise ValueError(
                f"in_channels={in_channels} must be divisible by condense_factor={factor} and"
                f" out_channels={out_channels} by groups={groups}"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        selected = groups * (in_channels // factor)
        self.register_buffer("index", torch.zeros(selected, dtype=torch.long))
        self.norm = nn.BatchNorm2d(selected)
        self.act = _activation(activation)
        self.conv = nn.Conv2d(selected, out_channels, 1, groups=groups, bias=False)

    @classmethod
    @torch.no_grad()
    def from_masked(cls, layer: LearnedGroupConv) -> CondensedLGC:
        """Convert a fully sparsified LearnedGroupConv (ValueError if its drops are not done)."""
        keep = layer._check_complete()  # [G, I]
        out = cls(
            layer.in_channels, layer.out_channels, layer.groups, layer.factor, layer.activation_name
        ).to(device=layer.conv.weight.device, dtype=layer.conv.weight.dtype)
        # group g's inputs in channel order, concatenated over groups
        index = torch.cat([row.nonzero().flatten() for row in keep])
        out.index.copy_(index)
        _copy_norm(out.norm, layer.norm, index)
        groups, per_group = layer.groups, index.numel() // layer.groups
        members = layer.out_channels // groups
        weight = layer.conv.weight.flatten(1)  # [O, I]
        # conv output row g*members + j is original output g + j*G, reading group g's inputs
        rows = _strided_groups(groups, members).flatten()
        cols = index.view(groups, 1, per_group).expand(groups, members, per_group)
        cols = cols.reshape(groups * members, per_group)
        new_weight = weight[rows.to(weight.device)[:, None], cols]
        out.conv.weight.copy_(new_weight[:, :, None, None])
        return out

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm(x.index_select(1, self.index)))
        y = self.conv(x)
        n, c, h, w = y.shape
        # block-major (g, j) -> original order j*G + g (official `ShuffleLayer`)
        return y.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class CondensedSFR(nn.Module):
    """Deploy form of SparseFeatureReactivation: BN -> act -> regroup -> group conv -> scatter-add.

    The k inputs are permuted so each strided group {g, g+G, ...} is contiguous (official
    `ShuffleLayerTrans`); group g's conv block computes its out/S kept outputs, and `index`
    (LongTensor of length G*out/S) says which of the out_channels slots each row adds into.
    Outputs kept by no group get 0. Replaces the official dense O x O float scatter matrix
    (CondenseNetV2 official issue #2: it made converted checkpoints larger).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int,
        sparse_factor: int | None = None,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        factor = groups if sparse_factor is None else sparse_factor
        _check_positive(
            in_channels=in_channels, out_channels=out_channels, groups=groups, sparse_factor=factor
        )
        if in_channels % groups or out_channels % factor:
            raise ValueError(
                f"in_channels={in_channels} must be divisible by groups={groups} and"
                f" out_channels={out_channels} by sparse_factor={factor}"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        rows = groups * (out_channels // factor)
        self.register_buffer("index", torch.zeros(rows, dtype=torch.long))
        self.norm = nn.BatchNorm2d(in_channels)
        self.act = _activation(activation)
        self.conv = nn.Conv2d(in_channels, rows, 1, groups=groups, bias=False)

    @classmethod
    @torch.no_grad()
    def from_masked(cls, layer: SparseFeatureReactivation) -> CondensedSFR:
        """Convert a fully sparsified SparseFeatureReactivation (ValueError if drops not done)."""
        keep = layer._check_complete()  # [G, O]
        out = cls(
            layer.in_channels, layer.out_channels, layer.groups, layer.factor, layer.activation_name
        ).to(device=layer.conv.weight.device, dtype=layer.conv.weight.dtype)
        _copy_norm(out.norm, layer.norm)
        groups = layer.groups
        members = layer.in_channels // groups
        # group g's kept outputs in channel order, concatenated over groups
        index = torch.cat([row.nonzero().flatten() for row in keep])
        out.index.copy_(index)
        per_group = index.numel() // groups
        weight = layer.conv.weight.flatten(1)  # [O, I]
        # row g*per_group + r is output index[...] reading group g's inputs g + m*G, m = 0..members-1
        cols = _strided_groups(groups, members).to(weight.device)
        cols = cols[:, None, :].expand(groups, per_group, members).reshape(-1, members)
        new_weight = weight[index.to(weight.device)[:, None], cols]
        out.conv.weight.copy_(new_weight[:, :, None, None])
        return out

    def forward(self, x: Tensor) -> Tensor:
        y = self._rows(x)
        n, _, h, w = y.shape
        return y.new_zeros(n, self.out_channels, h, w).index_add_(1, self.index, y)

    def reactivate(self, x: Tensor, new: Tensor) -> Tensor:
        """x + SFR(new) in one scatter-add into a copy of x (no zero map, no second pass)."""
        return x.index_add(1, self.index, self._rows(new))

    def _rows(self, x: Tensor) -> Tensor:
        """The kept (group, output) rows: BN -> act -> regroup -> group conv."""
        x = self.act(self.norm(x))
        n, c, h, w = x.shape
        # strided groups -> contiguous blocks (official `ShuffleLayerTrans`)
        x = x.view(n, c // self.groups, self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.conv(x)
