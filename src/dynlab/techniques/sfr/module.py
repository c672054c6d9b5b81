"""`technique=sfr`: CondenseNetV2 trained with its sparsification schedule, deployed condensed.

Yang et al., "CondenseNet V2: Sparse Feature Reactivation for Deep Networks", CVPR 2021 (official
code jianghaojun/CondenseNetV2). The backbone carries the layers (`dynlab.nn.condense`: LGC and
SFR with their masks); this module drops their weakest connections as training progresses and
converts them for inference:
- drops follow the optimiser step, from a Lightning hook (not `forward`, as the official global
  `LGC.global_progress`): drop s of a layer with S - 1 drops is due at step s * f * total / (S - 1)
  (f = `sparsify_fraction`, 0.5 as the official `2p >= s / (C - 1)`); a resumed or short run
  catches up on every drop that is due (the official `_check_drop` drops once however many stages
  it skipped, and the conversion then silently cuts the surplus);
- the rest of training keeps the masks fixed; masks and counters are buffers, so every checkpoint
  holds them, and EMA copies them instead of averaging (`dynlab.ema`);
- the deploy form replaces every LGC/SFR by its condensed form (index + group conv); a model whose
  schedule is incomplete is refused.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Self

from torch import Tensor, nn

from dynlab.backbones import Capability, backbones_with
from dynlab.config import BackboneConfig
from dynlab.data.base import DataInfo
from dynlab.logging import log_records
from dynlab.nn.condense import LearnedGroupConv, SparseFeatureReactivation
from dynlab.nn.reparam import fold_and_merge
from dynlab.protocol import StaticExits
from dynlab.techniques.base import DynlabModule, Phase, dataset_backbone, optimizer_steps_per_epoch
from dynlab.techniques.sfr.config import SFRConfig
from dynlab.traits import backbone_needed

SPARSE_LAYERS = (LearnedGroupConv, SparseFeatureReactivation)


def sparse_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every LGC and SFR layer of `net`, by name, in module order."""
    return [(n, m) for n, m in net.named_modules() if isinstance(m, SPARSE_LAYERS)]


def sparse_backbones() -> list[str]:
    """The registered backbones built from LGC/SFR layers (what `technique=sfr` runs on), as they
    declare it."""
    return backbones_with(Capability.sparse_layers)


def drops_due(step: int, total: int, stages: int, fraction: float) -> int:
    """How many of a layer's `stages` drops are due by optimiser step `step` of `total`: drop s
    at the first step with step / total >= s * fraction / stages."""
    if total <= 0:
        return stages
    return min(stages, math.floor(step * stages / (fraction * total) + 1e-9))


class SparsificationIncomplete(ValueError):
    """A model converted before every drop of its schedule was made."""


class SparseNet(StaticExits):
    """A network with LGC/SFR layers as a one-exit dynamic model; `deploy` condenses them."""

    def deploy(self) -> Self:
        """The condensed inference network (BatchNorms before a conv folded as for every net)."""
        if self.deployed:
            return self
        missing = [
            f"{name} ({int(m.drop_stage)} of {m.stages} drops)"
            for name, m in sparse_layers(self.net)
            if int(m.drop_stage) < m.stages
        ]
        if missing:
            raise SparsificationIncomplete(
                f"conversion refused: the sparsification schedule is incomplete in "
                f"{len(missing)} layers, e.g. {', '.join(missing[:3])}; train the run to the end "
                "of its sparsification stages (technique.sparsify_fraction of its steps) first"
            )
        net = copy.deepcopy(self)
        for name, layer in sparse_layers(net.net):
            net.net.set_submodule(name, layer.condensed())
        net.eval()  # condensed layers come in train mode
        fold_and_merge(net, method="forward_exits")
        net.deployed = True
        return net.requires_grad_(False)


class SFRModule(DynlabModule):
    """A CondenseNetV2-style backbone trained while its LGC/SFR connections are pruned."""

    phase_names = SFRConfig.PHASES
    config: SFRConfig

    def __init__(self, config: SFRConfig, backbone: BackboneConfig, data_info: DataInfo) -> None:
        super().__init__(config, backbone)
        net = dataset_backbone(backbone, data_info)
        if not sparse_layers(net):
            raise ValueError(backbone_needed("sfr", backbone.name))
        self.model = SparseNet(net)
        self.drop_history: list[dict[str, Any]] = []

    @property
    def layers(self) -> list[tuple[str, nn.Module]]:
        return sparse_layers(self.model.net)

    @property
    def stages(self) -> int:
        """Drops of the longest schedule among the layers (condense/sparse factor - 1)."""
        return max(m.stages for _, m in self.layers)

    def check_run(self, cfg: Any) -> None:
        """Enough epochs for the schedule: one per sparsification stage within its fraction."""
        epochs = self.phase_epochs(Phase("train")) or int(cfg.trainer.max_epochs)
        fraction = self.config.sparsify_fraction
        need = math.ceil(self.stages / fraction)
        if epochs < need:
            raise ValueError(
                f"{epochs} training epochs are fewer than the {need} its schedule "
                f"needs: {self.stages} sparsification stages (the backbone's largest condense/"
                f"sparse factor minus 1), one epoch each within the first {fraction:.0%} of "
                f"training, then fixed masks; set trainer.max_epochs={need} or more"
            )

    # --- training -----------------------------------------------------------------------------
    def exit_losses(self, logits: list[Tensor], y: Tensor) -> Tensor:
        loss = super().exit_losses(logits, y)
        if self.config.group_lasso:
            loss = loss + self.config.group_lasso * sum(m.group_lasso() for _, m in self.layers)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.sparsify(self.trainer.global_step)

    def on_train_end(self) -> None:
        """A run shorter than its schedule (limited batches) still makes every drop by its end."""
        self.sparsify(self._total_steps(), log=False)
        records = [{k: v for k, v in r.items() if k != "densities"} for r in self.drop_history]
        log_records(self.trainer.loggers, "sparsification", records, "step", "lgc_density", "")

    def sparsify(self, step: int, log: bool = True) -> None:
        """Make every drop due by optimiser step `step` (several at once after a resume), and
        record each: step, stage, per-layer densities (also logged as metrics with `log`; Lightning
        refuses `self.log` in on_train_end, whose drops reach the loggers as records only)."""
        total = self._total_steps()
        dropped = False
        for _, layer in self.layers:
            due = drops_due(step, total, layer.stages, self.config.sparsify_fraction)
            while int(layer.drop_stage) < due:
                layer.drop()
                dropped = True
        if not dropped:
            return
        kinds = {"lgc_density": LearnedGroupConv, "sfr_density": SparseFeatureReactivation}
        record: dict[str, Any] = {
            "step": step,
            "stage": max(int(m.drop_stage) for _, m in self.layers),
            **{
                k: _mean(m.density() for _, m in self.layers if isinstance(m, t))
                for k, t in kinds.items()
            },
            "densities": {name: round(m.density(), 6) for name, m in self.layers},
        }
        self.drop_history.append(record)
        for key in ("stage", "lgc_density", "sfr_density") if log else ():
            self.log(f"sparsify/{key}", float(record[key]))

    def _total_steps(self) -> int:
        trainer = self.trainer
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return trainer.max_steps
        return optimizer_steps_per_epoch(trainer) * max(1, trainer.max_epochs or 1)

    # --- state and results ----------------------------------------------------------------------
    def technique_state(self) -> dict[str, Any]:
        return {"drop_history": self.drop_history}

    def load_technique_state(self, state: dict[str, Any]) -> None:
        self.drop_history = list(state.get("drop_history", []))

    def deployed_cost(self, input_size: tuple[int, int, int]) -> dict[str, Any]:
        """The condensed network's cost, the masked (training) form's MACs next to it, and every
        drop of the schedule (results.json)."""
        cost = super().deployed_cost(input_size)
        cost["masked_macs"] = self.model.exit_macs(input_size)
        cost["sparsification"] = self.drop_history
        return cost


def _mean(values: Any) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 1.0
