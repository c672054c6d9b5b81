"""BatchNorm folded into the convolution before it: the conversion every deploy form shares.

In eval mode a BatchNorm is a per-channel affine map, so when it reads nothing but a conv's output
and is that output's only reader, it can be merged into the conv's weight and bias (torch's
`torch.nn.utils.fusion.fuse_conv_bn_eval` / `fuse_conv_bn_weights`) and replaced by nn.Identity.
Such pairs are found on a torch.fx trace of the model's own forward (or of `forward_exits`, so every
exit's path counts), with convs and norms kept as leaves: a module is folded only if every call of
it in the trace fits the pattern. Techniques with their own conv layers (S2DNAS's per-stage weight
blocks) register how to fold a norm into them with `register_conv_bn_fuser`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

Fuser = Callable[[nn.Module, _BatchNorm], nn.Module]
FuserT = TypeVar("FuserT", bound=Fuser)


class _ConvBnFuser:
    """How to fold a norm of one of `norm_types` into a conv of a registered type."""

    def __init__(self, norm_types: tuple[type[_BatchNorm], ...], fuse: Fuser) -> None:
        self.norm_types, self.fuse = norm_types, fuse


# conv type (exact: a subclass may transform its weight, e.g. timm's StdConv2d) -> its fuser
_FUSERS: dict[type[nn.Module], _ConvBnFuser] = {}
# SyncBatchNorm (trainer.sync_batchnorm under DDP) is a BatchNorm in eval mode: folded the same way.
_PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def register_conv_bn_fuser(
    *conv_types: type[nn.Module], norms: tuple[type[_BatchNorm], ...] = _PLAIN_NORMS
) -> Callable[[FuserT], FuserT]:
    """Decorator: `fuse(conv, norm)` returns the conv with `norm` folded in, for these conv types
    followed by a norm of exactly one of `norms` types (both in eval mode)."""

    def register(fuse: FuserT) -> FuserT:
        for conv_type in conv_types:
            _FUSERS[conv_type] = _ConvBnFuser(tuple(norms), fuse)
        return fuse

    return register


@register_conv_bn_fuser(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _fuse_plain_conv(conv: nn.Module, norm: _BatchNorm) -> nn.Module:
    """torch's own fusion: a new conv whose weight and bias include the norm's affine map."""
    if conv.out_channels != norm.num_features:  # type: ignore[union-attr]
        raise ValueError(
            f"{norm.num_features}-channel norm after a {conv.out_channels}-channel conv"
        )
    return fuse_conv_bn_eval(conv, norm)  # type: ignore[arg-type]


class _LeafTracer(fx.Tracer):
    """fx tracer keeping foldable convs, every BatchNorm and timm's untraceable modules whole."""

    def __init__(self) -> None:
        from timm.layers import get_notrace_functions, get_notrace_modules

        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.leaves = (*_FUSERS, _BatchNorm, *get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


class _Method(nn.Module):
    """`module.<method>` as the forward of a module holding `module`, so fx can trace it."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module, self.method = module, method

    def forward(self, x: Tensor) -> object:
        return getattr(self.module, self.method)(x)


def fold_bn_into_kernel(
    kernel: Tensor, bias: Tensor | None, norm: nn.Module
) -> tuple[Tensor, Tensor]:
    """(kernel, bias) of `norm(conv(x))` with `norm` in eval mode, for a conv of this kernel and
    bias (None: no bias); `norm` must be a BatchNorm with running statistics, one per output."""
    has_stats = isinstance(norm, _BatchNorm) and norm.running_mean is not None
    if not has_stats or norm.running_var is None:
        raise ValueError(
            f"cannot fold {type(norm).__name__} into a kernel: re-parameterisation needs a "
            "BatchNorm with running statistics (track_running_stats=True)"
        )
    if norm.num_features != kernel.shape[0]:
        raise ValueError(f"{norm.num_features}-channel norm after a {kernel.shape[0]}-output conv")
    with torch.no_grad():
        weight, fused_bias = fuse_conv_bn_weights(
            kernel, bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
        )
    return weight.detach(), fused_bias.detach()


def trace_with_leaves(module: nn.Module, method: str = "forward") -> fx.GraphModule:
    """fx trace of `module.<method>(x)` with registered convs, norms and timm's untraceable modules
    as leaves; for another method than forward, module names start with `module.`. Raises fx's
    own error when the method cannot be traced symbolically."""
    root = module if method == "forward" else _Method(module, method)
    return fx.GraphModule(root, _LeafTracer().trace(root))


def conv_bn_pairs(module: nn.Module, method: str = "forward") -> list[tuple[str, str]]:
    """(conv name, norm name) of every foldable pair in `module.<method>(x)`, in forward order.

    Foldable: at every call of the norm its only input is the output of that conv, that output has
    no other reader, and the conv's type has a fuser for the norm's type. Raises fx's own error
    when the method cannot be traced symbolically.
    """
    prefix = "" if method == "forward" else "module."
    traced = trace_with_leaves(module, method)
    graph, modules = traced.graph, dict(traced.named_modules())
    norm_inputs: dict[str, set[str | None]] = {}  # norm -> the convs its calls read (None: other)
    conv_readers: dict[str, set[str | None]] = {}  # conv -> the norms reading it (None: other)
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        target = modules[node.target]
        if isinstance(target, _BatchNorm):
            source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            conv = _conv_name(source, modules)
            norm_inputs.setdefault(node.target, set()).add(conv)
        elif type(target) in _FUSERS:
            conv_readers.setdefault(node.target, set()).update(
                user.target if _reads_only(user, node, modules) else None for user in node.users
            )
    pairs = []
    for norm, convs in norm_inputs.items():
        conv = next(iter(convs))
        if len(convs) != 1 or conv is None or conv_readers.get(conv) != {norm}:
            continue
        if type(modules[norm]) in _FUSERS[type(modules[conv])].norm_types:
            pairs.append((conv.removeprefix(prefix), norm.removeprefix(prefix)))
    return pairs


def fold_batchnorm(module: nn.Module, method: str = "forward") -> list[tuple[str, str]]:
    """Fold, in place, every norm that follows a conv in `module.<method>` into that conv.

    The module is put in eval mode (folding uses the running statistics); each folded norm becomes
    nn.Identity. Norms without running statistics, and every norm of a module fx cannot trace
    (a warning says which), are left as they are: the outputs stay exact, only unfolded. Returns
    the folded (conv, norm) names.
    """
    module.eval()
    if not any(isinstance(m, _BatchNorm) for m in module.modules()):
        return []
    try:
        pairs = conv_bn_pairs(module, method)
    except Exception as err:  # fx raises many types (TraceError, TypeError, NotImplementedError)
        warnings.warn(
            f"BatchNorm left unfolded in {type(module).__name__}: its {method} cannot be traced "
            f"by torch.fx ({type(err).__name__}: {err})",
            stacklevel=2,
        )
        return []
    folded = []
    with torch.no_grad():
        for conv_name, norm_name in pairs:
            conv, norm = module.get_submodule(conv_name), module.get_submodule(norm_name)
            if not norm.track_running_stats or norm.running_mean is None:
                continue  # normalises with batch statistics even in eval mode: not foldable
            _replace(module, conv_name, _FUSERS[type(conv)].fuse(conv, norm))
            _replace(module, norm_name, nn.Identity())
            folded.append((conv_name, norm_name))
    return folded


def _conv_name(node: object, modules: dict[str, nn.Module]) -> str | None:
    """The module name of `node` when it is a call of a conv with a registered fuser."""
    is_conv = isinstance(node, fx.Node) and node.op == "call_module"
    return str(node.target) if is_conv and type(modules[node.target]) in _FUSERS else None


def _reads_only(user: fx.Node, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """`user` is a norm call whose single input is `node`."""
    return (
        user.op == "call_module"
        and isinstance(modules[user.target], _BatchNorm)
        and user.args == (node,)
        and not user.kwargs
    )


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
