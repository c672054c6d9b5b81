"""The S2D network: a static CNN run as s thin full-depth stages, one exit after each.

Stage k runs the backbone's own `forward_features` on its channel slice of every layer (see
`layers.py`); its last feature map is average-pooled and fed to exit k's linear classifier (as the
paper's per-stage classifiers), or, with `exit_features="all"`, concatenated with the pooled maps of
stages 1..k-1 first. Stages run in order and reuse earlier stages' features, so
the MACs to reach exit k are cumulative and measured, and an early-exit session really stops
computing later stages for the samples that left.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Self

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from dynlab.evaluation.outputs import evaluating, module_device
from dynlab.nn.fuse import trace_with_leaves
from dynlab.protocol import DynamicNet, ExitStage
from dynlab.techniques.s2dnas.analysis import (
    SUPPORTED_BACKBONES,
    BackboneLayout,
    UnsupportedBackboneError,
)
from dynlab.techniques.s2dnas.layers import (
    StageAttributes,
    StageCursor,
    StagedConv2d,
    StagedDepthwiseConv2d,
    StageRun,
)
from dynlab.techniques.s2dnas.settings import S2DSettings
from dynlab.techniques.s2dnas.transform import mask_to_plan, plan_stages, stage_backbone


class S2DNet(DynamicNet):
    """A backbone transformed in place into `settings.num_stages` stages with one exit each.

    The exit of stage k is a linear classifier over the pooled last feature map of stage k
    (`exit_features="own"`) or of stages 1..k (`"all"`); the last exit starts from the backbone's
    own classifier (its columns of stage s's channels, for "own"), so with one stage the network is
    the original one. The transformation is checked when built: the stages' last feature maps,
    concatenated, must equal those of the original network with the unread weight blocks zeroed.
    """

    def __init__(
        self,
        backbone: nn.Module,
        layout: BackboneLayout,
        settings: S2DSettings,
        groups: int,
        input_size: tuple[int, int, int],
        exit_features: str = "own",
    ) -> None:
        super().__init__()
        if exit_features not in ("own", "all"):
            raise ValueError(f"exit_features must be 'own' or 'all', got {exit_features!r}")
        self.exit_features = exit_features
        classifier = backbone.get_classifier()  # type: ignore[operator]
        if not isinstance(classifier, nn.Linear) or classifier.in_features != layout.out_channels:
            raise UnsupportedBackboneError(
                f"{layout.backbone}: the classifier must be one nn.Linear over the "
                f"{layout.out_channels} pooled features. Backbones that work: {SUPPORTED_BACKBONES}."
            )
        reference = copy.deepcopy(backbone)
        self.layout, self.settings, self.groups = layout, settings, groups
        self.input_size = input_size
        self.plan = plan_stages(layout, settings, groups)
        self.cursor = StageCursor()
        stage_backbone(backbone, layout, self.plan, self.cursor)
        backbone.reset_classifier(0)  # type: ignore[operator]
        self.backbone = backbone
        own = exit_features == "own"
        self.heads = nn.ModuleList(
            nn.Linear(stop - start if own else stop, classifier.out_features)
            for start, stop in self.plan.out_bounds
        )
        start = self.plan.out_bounds[-1][0] if own else 0
        with torch.no_grad():
            self.heads[-1].weight.copy_(classifier.weight[:, start:])
            self.heads[-1].bias.copy_(classifier.bias)
        # The deploy form's flat program of each stage (None: stages run through the cursor).
        self.programs: nn.ModuleList | None = None
        mask_to_plan(reference, layout, self.plan)
        self._verify(reference, input_size)

    @property
    def num_stages(self) -> int:
        return self.settings.num_stages

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        """Logits of every exit, cheapest first."""
        run = StageRun(x)
        return [self._advance(run)[1] for _ in range(self.num_stages)]

    def exit_session(self, x: Tensor) -> S2DExitSession:
        """Stage-by-stage evaluation of `x` where exited samples stop being computed."""
        return S2DExitSession(self, x)

    def deploy(self) -> Self:
        """The inference form: BatchNorm folded into every stage's weight blocks (the staged layers
        register their fusers), then each stage compiled into one flat program (`stage_programs`).
        """
        if self.deployed:
            return self
        net = super().deploy()
        net.programs = stage_programs(net.backbone, net.num_stages)
        return net

    def export_stages(self) -> list[ExitStage]:
        """One `S2DStage` per stage: what each stage keeps for later ones (its convs' inputs, and
        the pooled maps for `exit_features="all"`) is carried between them as tensors."""
        run = StageRun(torch.zeros(1, *self.input_size, device=module_device(self)))
        kept: list[list[tuple[int, int]]] = [[]]
        with evaluating(self):
            for _ in range(self.num_stages):
                self._advance(run)
                kept.append(sorted((i, k) for i, by in run.conv_inputs.items() for k in by))
        kept[-1] = []  # nothing runs after the last stage
        return [S2DStage(self, k, kept[k], kept[k + 1]) for k in range(self.num_stages)]

    def exit_macs(self, input_size: tuple[int, int, int]) -> list[float]:
        """Measured cumulative MACs per sample to reach each exit (stages 1..k plus exit k)."""
        from dynlab.evaluation.macs import count_macs

        return [
            float(count_macs(partial(self._logits_through, stages=k + 1), input_size, module=self))
            for k in range(self.num_stages)
        ]

    def _logits_through(self, x: Tensor, stages: int) -> Tensor:
        run = StageRun(x)
        for _ in range(stages):
            logits = self._advance(run)[1]
        return logits

    def _advance(self, run: StageRun) -> tuple[Tensor, Tensor]:
        """Run the next stage of `run`: its last feature map and its exit's logits."""
        if run.stage >= self.num_stages:
            raise RuntimeError(f"all {self.num_stages} stages have run")
        if self.programs is not None:
            features = self.programs[run.stage](run.image, run.conv_inputs)
        else:
            self.cursor.run = run
            try:
                features = self.backbone.forward_features(run.image)  # type: ignore[operator]
            finally:
                self.cursor.run = None
        run.pooled.append(features.mean(dim=(2, 3)))
        pooled = run.pooled[-1] if self.exit_features == "own" else torch.cat(run.pooled, dim=1)
        logits = self.heads[run.stage](pooled)
        run.stage += 1
        return features, logits

    def _verify(self, reference: nn.Module, input_size: tuple[int, int, int]) -> None:
        """Compare with the masked original on a random batch; raise if the stages differ from it."""
        backbone, works = self.layout.backbone, f"Backbones that work: {SUPPORTED_BACKBONES}."
        x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
        with evaluating(reference), evaluating(self):
            expected = reference.forward_features(x)  # type: ignore[operator]
            run = StageRun(x)
            try:
                stages = [self._advance(run) for _ in range(self.num_stages)]
            except RuntimeError as err:
                raise UnsupportedBackboneError(
                    f"{backbone}: forward_features cannot run stage by stage ({err}); it mixes "
                    "channels outside Conv2d layers (a functional concatenation or channel "
                    f"shuffle). {works}"
                ) from err
            features = torch.cat([f for f, _ in stages], dim=1)
            if not _close(features, expected):
                raise UnsupportedBackboneError(
                    f"{backbone}: the stages do not reproduce forward_features; it mixes channels "
                    f"outside Conv2d layers (a concatenation, a shuffle, a gate). {works}"
                )
            head = reference.get_classifier()  # type: ignore[operator]
            pooled = expected.mean(dim=(2, 3))
            plain_head = F.linear(pooled, head.weight, head.bias)
            # the last exit reads stage s's channels ("own") or all of them ("all")
            start = self.plan.out_bounds[-1][0] if self.exit_features == "own" else 0
            last_exit = F.linear(pooled[:, start:], head.weight[:, start:], head.bias)
            head_ok = _close(plain_head, reference.forward_head(expected))  # type: ignore[operator]
            if not head_ok or not _close(stages[-1][1], last_exit):
                raise UnsupportedBackboneError(
                    f"{backbone}: forward_head is not global average pooling plus the linear "
                    f"classifier, which the S2D exits replace. {works}"
                )


class S2DExitSession:
    """Early-exit evaluation of one batch (see `dynlab.protocol.ExitSession`)."""

    def __init__(self, net: S2DNet, x: Tensor) -> None:
        self.net, self.run = net, StageRun(x)
        self.num_exits = net.num_stages

    def next_exit(self) -> Tensor:
        """Run the next stage on the samples still in the batch; its exit's logits."""
        return self.net._advance(self.run)[1]

    def keep(self, mask: Tensor) -> None:
        """Drop the samples where `mask` is False from every later stage."""
        self.run.keep(mask)


class S2DStage(ExitStage):
    """Stage k of an S2D network as a module of tensors (`dynlab.protocol.ExitStage`): carried in,
    the conv inputs `kept_in` ((conv index, stage) pairs) then the earlier pooled maps ("all");
    out, the logits, the conv inputs `kept_out` and the pooled maps up to this stage ("all")."""

    def __init__(
        self,
        net: S2DNet,
        stage: int,
        kept_in: Sequence[tuple[int, int]],
        kept_out: Sequence[tuple[int, int]],
    ) -> None:
        super().__init__()
        self.net, self.stage = net, stage
        self.kept_in, self.kept_out = list(kept_in), list(kept_out)
        last = stage == net.num_stages - 1
        self.pooled_in = stage if net.exit_features == "all" else 0
        self.pools_out = net.exit_features == "all" and not last

    def forward(self, image: Tensor, *carried: Tensor) -> tuple[Tensor, ...]:
        run = StageRun(image)
        run.stage = self.stage
        kept, run.pooled = carried[: len(self.kept_in)], list(carried[len(self.kept_in) :])
        for (index, stage), tensor in zip(self.kept_in, kept, strict=True):
            run.conv_inputs.setdefault(index, {})[stage] = tensor
        logits = self.net._advance(run)[1]
        kept_out = [run.conv_inputs[index][stage] for index, stage in self.kept_out]
        return (logits, *kept_out, *(run.pooled if self.pools_out else ()))


# Activation modules called as their function (and its keyword arguments) in a stage program: at
# batch 1 the module call costs as much as the activation itself.
_ACTIVATIONS: dict[type[nn.Module], Callable[[Any], tuple[Callable[..., Tensor], dict]]] = {
    nn.ReLU: lambda m: (torch.relu_ if m.inplace else torch.relu, {}),
    nn.ReLU6: lambda m: (F.relu6, {"inplace": m.inplace}),
}


def stage_programs(backbone: nn.Module, num_stages: int) -> nn.ModuleList | None:
    """One fx program per stage computing `backbone.forward_features` of that stage, for the
    deploy form: every staged conv becomes a direct F.conv2d on the stage's weight block (kept
    inputs passed in as `conv_inputs`), ReLU/ReLU6 modules their functions, and the nn.Identity
    left by folded norms disappears.

    Same operations as running the backbone through the cursor, minus the per-layer module calls
    and lookups, which at batch 1 cost as much as the thin stages' convolutions. None when a norm
    was left unfolded (its per-stage slicing stays with the cursor path).
    """
    traced = trace_with_leaves(backbone, "forward_features")
    modules = dict(traced.named_modules())
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules.values()):
        return None
    programs = []
    for k in range(num_stages):
        graph = copy.deepcopy(traced.graph)
        image = next(n for n in graph.nodes if n.op == "placeholder")
        with graph.inserting_after(image):
            conv_inputs = graph.placeholder("conv_inputs")
        for node in list(graph.nodes):
            module = modules.get(node.target) if node.op == "call_module" else None
            if module is None:
                continue
            with graph.inserting_before(node):
                if isinstance(module, nn.Identity):
                    replacement = node.args[0]
                elif type(module) in _ACTIVATIONS:
                    function, kwargs = _ACTIVATIONS[type(module)](module)
                    replacement = graph.call_function(function, node.args, kwargs)
                elif isinstance(module, StagedConv2d | StagedDepthwiseConv2d):
                    name = f"stage{k}_" + str(node.target).removeprefix("module.")
                    attrs = StageAttributes(traced, name.replace(".", "_"))
                    replacement = module.stage_node(graph, node.args[0], conv_inputs, k, attrs)
                else:
                    continue
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
        graph.lint()
        programs.append(fx.GraphModule(traced, graph, class_name=f"S2DStage{k + 1}"))
    return nn.ModuleList(programs)


def multi_exit_loss(
    logits: Sequence[Tensor], y: Tensor, weights: Sequence[float], label_smoothing: float = 0.0
) -> Tensor:
    """sum_k w_k CE(exit_k, y): MSDNet's weighted cumulative loss (Huang et al., ICLR 2018, Sec. 4)."""
    if len(weights) != len(logits):
        raise ValueError(f"{len(weights)} loss weights for {len(logits)} exits")
    return sum(
        w * F.cross_entropy(z, y, label_smoothing=label_smoothing)
        for w, z in zip(weights, logits, strict=True)
    )  # type: ignore[return-value]


def _close(actual: Tensor, expected: Tensor) -> bool:
    """Equal up to float32 summation-order noise, relative to the tensor's scale."""
    scale = float(expected.abs().max().clamp(min=1.0))
    return actual.shape == expected.shape and bool(
        torch.allclose(actual, expected, rtol=1e-3, atol=1e-4 * scale)
    )
