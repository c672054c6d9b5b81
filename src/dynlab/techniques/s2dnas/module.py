"""`technique=s2dnas`: a static backbone transformed into a multi-stage dynamic network (S2DNAS).

Yuan et al., "S2DNAS: Transforming Static CNN Model for Dynamic Inference via Neural Architecture
Search", ECCV 2020. `mode=train` (dynlab-train) trains the network given by the config's split
points and indicator matrices with the multi-exit loss. `mode=search` (dynlab-search) runs the schedule
  search (custom) -> retrain_1 .. retrain_k (fit, the k best distinct candidates from scratch)
  -> select (custom: keep the retrained network with the best val score);
the retrain phases appear once the search has found its candidates.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from dynlab.checkpointing import FINAL, load_static_weights, phase_dir
from dynlab.config import BackboneConfig
from dynlab.data.base import DataInfo, DynlabDataModule
from dynlab.evaluation.macs import count_macs
from dynlab.results import atomic_write_text
from dynlab.search import CandidateTrainer, derived_seed, seeded, val_exit_probs
from dynlab.search.driver import SearchDriver, data_identity
from dynlab.techniques.base import DynlabModule, Phase, PhaseContext, PhaseKind, dataset_backbone
from dynlab.techniques.s2dnas.analysis import analyse_backbone
from dynlab.techniques.s2dnas.config import S2DNASConfig, SelectBy
from dynlab.techniques.s2dnas.controller import Controller, Reinforce
from dynlab.techniques.s2dnas.model import S2DNet, multi_exit_loss
from dynlab.techniques.s2dnas.reward import dynamic_score, inference_record, reward
from dynlab.techniques.s2dnas.search import (
    CONTROLLER_STREAM,
    RETRAIN_STREAM,
    CandidateEvaluator,
    ControllerSearch,
)
from dynlab.techniques.s2dnas.settings import S2DSettings, resolve_settings

SEARCH, SELECT, RETRAIN = "search", "select", "retrain_"


class S2DNASModule(DynlabModule):
    """The S2D network of a backbone, its multi-exit training, and the search over its settings."""

    phase_names = S2DNASConfig.PHASES  # train, search, retrain_*, select

    config: S2DNASConfig

    def __init__(self, config: S2DNASConfig, backbone: BackboneConfig, data_info: DataInfo) -> None:
        super().__init__(config, backbone)
        self.backbone_cfg, self.data_info = backbone, data_info
        self.exit_features = str(config.exit_features)
        num_stages, loss_weights = config.num_stages, config.loss_weights
        self.loss_weights = [1.0] * num_stages if loss_weights is None else list(loss_weights)
        if len(self.loss_weights) != num_stages:
            raise ValueError(
                f"s2dnas: {len(self.loss_weights)} loss_weights for {num_stages} stages"
            )
        config.search.stage_thresholds(num_stages)  # a threshold list: one per early exit
        init_from = config.init_from
        self.static_weights = load_static_weights(init_from) if init_from else None
        net = self._new_backbone()
        self.layout = analyse_backbone(net, data_info.input_size, backbone.name)
        settings = resolve_settings(
            config.split_points,
            config.concat,
            num_stages,
            self.layout.num_layer_groups,
            config.groups,
        )
        self.model = S2DNet(
            net, self.layout, settings, config.groups, data_info.input_size, self.exit_features
        )
        self.top_k: list[dict[str, Any]] = []  # the search's best candidates (settings, reward)
        self.retrained: dict[str, dict[str, Any]] = {}  # retrain phase -> its val score
        self.selected: str | None = None
        # early exit on test at the thresholds set on val (on_test_end; results.json)
        self.inference: dict[str, Any] | None = None

    # --- training -----------------------------------------------------------------------------
    def exit_losses(self, logits: list[Tensor], y: Tensor) -> Tensor:
        return multi_exit_loss(logits, y, self.loss_weights, self.config.optim.label_smoothing)

    def check_run(self, cfg: Any) -> None:
        """A search that must start from a trained static model has one (`search.require_static`)."""
        if (
            cfg.get("mode") == "search"
            and self.config.search.require_static
            and not self.static_weights
        ):
            raise ValueError(
                "s2dnas: this search transforms a trained static model, as the paper does: set "
                "technique.init_from=<static run>/checkpoints/train/final.ckpt (train it first with "
                "technique=baseline and the same backbone and dataset)"
            )

    # --- phases -------------------------------------------------------------------------------
    def phases(self, mode: str) -> list[Phase]:
        if mode != "search":
            return super().phases(mode)
        if self.model.num_stages < 2:
            raise ValueError(
                "s2dnas: a search needs technique.num_stages >= 2 (one stage has nothing to split)"
            )
        schedule = [Phase(SEARCH, PhaseKind.custom)]
        if self.top_k:
            retrain_epochs = self.config.search.retrain_epochs
            schedule += [
                Phase(f"{RETRAIN}{i}", max_epochs=retrain_epochs)
                for i in range(1, len(self.top_k) + 1)
            ]
            schedule.append(Phase(SELECT, PhaseKind.custom))
        return schedule

    def start_phase(self, phase: Phase) -> None:
        """A retrain phase starts from a fresh network with its candidate's settings (on a resume,
        the network already has them and keeps its weights)."""
        super().start_phase(phase)
        if phase.name.startswith(RETRAIN):
            i = int(phase.name.removeprefix(RETRAIN))
            settings = S2DSettings.from_dict(self.top_k[i - 1]["settings"])
            if settings != self.model.settings:
                self._use(settings, derived_seed(self.config.seed, RETRAIN_STREAM, i))

    def run_custom_phase(self, phase: Phase, ctx: PhaseContext) -> None:
        if phase.name == SEARCH:
            self._search(ctx)
        elif phase.name == SELECT:
            self._select(ctx)
        else:
            super().run_custom_phase(phase, ctx)

    def on_fit_end(self) -> None:
        """After a retrain phase, score the network on val as the search did (for `select`)."""
        if self.current_phase and self.current_phase.startswith(RETRAIN):
            datamodule = self.trainer.datamodule  # type: ignore[attr-defined]
            self.retrained[self.current_phase] = self._val_score(datamodule)

    # --- technique state ----------------------------------------------------------------------
    def technique_state(self) -> dict[str, Any]:
        return {
            "settings": self.model.settings.to_dict(),
            "exit_features": self.exit_features,
            "top_k": self.top_k,
            "retrained": self.retrained,
            "selected": self.selected,
        }

    def load_technique_state(self, state: dict[str, Any]) -> None:
        """Rebuild the network for the saved settings (before its weights are loaded)."""
        if not state:
            return
        settings = S2DSettings.from_dict(state["settings"])
        # checkpoints from before the per-stage exits read stages 1..k
        exit_features = state.get("exit_features", "all")
        if settings != self.model.settings or exit_features != self.exit_features:
            self.exit_features = exit_features
            self._use(settings, self.config.seed)
        self.top_k = state.get("top_k", [])
        self.retrained = state.get("retrained", {})
        self.selected = state.get("selected")

    # --- building -----------------------------------------------------------------------------
    def _new_backbone(self) -> torch.nn.Module:
        """The static backbone, with the `init_from` weights when given."""
        net = dataset_backbone(self.backbone_cfg, self.data_info)
        if self.static_weights is not None:
            try:
                net.load_state_dict(self.static_weights)
            except RuntimeError as err:
                raise ValueError(
                    f"s2dnas init_from: the weights do not fit backbone {self.backbone_cfg.name}: {err}"
                ) from err
        return net

    def _build(self, settings: S2DSettings) -> S2DNet:
        return S2DNet(
            self._new_backbone(),
            self.layout,
            settings,
            self.config.groups,
            self.data_info.input_size,
            self.exit_features,
        )

    def _use(self, settings: S2DSettings, seed: int) -> None:
        """Replace the network by a new one with `settings`, initialised from `seed`."""
        with seeded(seed):
            self.model = self._build(settings).to(self.device).train(self.training)

    def _static_macs(self) -> float:
        return float(count_macs(self._new_backbone(), self.data_info.input_size))

    # --- search and selection -----------------------------------------------------------------
    def _search(self, ctx: PhaseContext) -> None:
        cfg = self.config.search
        with seeded(derived_seed(self.config.seed, CONTROLLER_STREAM)):
            controller = Controller(
                self.layout.num_layer_groups,
                self.model.num_stages,
                self.config.groups,
                cfg.controller_hidden,
            )
        evaluate = CandidateEvaluator(
            build=self._build,
            datamodule=ctx.datamodule,  # type: ignore[arg-type]
            optim=self.config.optim,
            loss_weights=self.loss_weights,
            input_size=self.data_info.input_size,
            static_macs=self._static_macs(),
            cfg=cfg,
            trainer=CandidateTrainer.from_trainer_config(
                ctx.cfg.trainer if ctx.cfg is not None else None
            ),
        )
        reinforce = Reinforce(controller, cfg.controller_lr, cfg.baseline_decay, cfg.entropy_weight)
        trainer = evaluate.trainer
        space = {
            **self._space(),
            "precision": str(trainer.precision),
            "gradient_clip_val": trainer.gradient_clip_val,
        }
        search = ControllerSearch(
            controller, reinforce, evaluate, cfg, space, data_identity(ctx.datamodule)
        )
        outcome = SearchDriver(search, ctx.phase_dir, self.config.seed, cfg.candidates_on).run()
        self.top_k = outcome.result["top_k"]

    def _space(self) -> dict[str, Any]:
        """What the search space is: the backbone (and the static weights it starts from), the
        stages and groups, what the exits read, the loss weights and the candidates' optimiser."""
        return {
            "backbone": self.backbone_cfg.name,
            "backbone_kwargs": dict(self.backbone_cfg.kwargs),
            "init_from": self.config.init_from,
            "layer_groups": self.layout.num_layer_groups,
            "num_stages": self.model.num_stages,
            "groups": self.config.groups,
            "exit_features": self.exit_features,
            "loss_weights": self.loss_weights,
            "optim": json.loads(json.dumps(asdict(self.config.optim), default=str)),
        }

    def _val_score(self, datamodule: DynlabDataModule) -> dict[str, Any]:
        """Val accuracy under dynamic inference, average MACs and reward, as for a candidate."""
        probs, targets = val_exit_probs(self.model, datamodule.whole_val_loader())
        macs = self.model.exit_macs(self.data_info.input_size)
        score = dynamic_score(probs, targets, macs, self._static_macs(), self.config.search)
        return {
            "settings": self.model.settings.to_dict(),
            "reward": reward(score, self.config.search),
            "rule": str(self.config.search.exit_rule),
            **score.as_dict(),
        }

    def _select(self, ctx: PhaseContext) -> None:
        """Load the retrained network with the best val reward (or val accuracy, `select_by`)."""
        if not self.retrained:
            raise RuntimeError("s2dnas select: no retrain phase has recorded a val score")
        key = "reward" if self.config.search.select_by == SelectBy.reward else "accuracy"
        best = max(self.retrained, key=lambda p: self.retrained[p][key])
        checkpoint = torch.load(
            phase_dir(ctx.run_dir, best) / FINAL, map_location="cpu", weights_only=False
        )
        settings = S2DSettings.from_dict(checkpoint["dynlab"]["technique"]["settings"])
        self._use(settings, self.config.seed)
        self.load_state_dict(checkpoint["state_dict"])
        self.selected = best
        summary = {
            "selected": best,
            "by": key,
            "thresholds": self.retrained[best]["thresholds"],  # its val score's (None: +-inf)
            "retrained": self.retrained,
        }
        atomic_write_text(ctx.phase_dir / "selection.json", json.dumps(summary, indent=2))

    # --- test-time report -----------------------------------------------------------------------
    def on_test_end(self) -> None:
        """After the test loop and the evaluation callbacks, while the deploy form is in place:
        early exit on test at the thresholds `search.exit_rule` sets on val, as the reward used
        them (the selected network's val score: same rule, same val split). Every rank takes part
        (the outputs are all-gathered); `deployed_cost` puts it into results.json."""
        try:
            self.inference = self._inference_on_test()
        finally:
            super().on_test_end()

    def _inference_on_test(self) -> dict[str, Any] | None:
        from dynlab.evaluation.callbacks import dynamic_model, exit_outputs, input_size

        trainer, datamodule = self.trainer, self.trainer.datamodule  # type: ignore[attr-defined]
        if datamodule is None:  # a test on bare dataloaders: no val split to set thresholds on
            return None
        model = dynamic_model(trainer, self)  # the callbacks' model: their cached outputs
        record = inference_record(
            exit_outputs(trainer, model, datamodule, "val"),  # thresholds: val only
            exit_outputs(trainer, model, datamodule, "test"),
            model.exit_macs(input_size(datamodule)),
            self._static_macs(),
            self.config.search,
        )
        if trainer.is_global_zero:
            shown = ", ".join(f"{t:.3g}" for t in record["thresholds"])
            print(
                f"[s2dnas] early exit on test at the val thresholds ({record['rule']}: {shown}): "
                f"top-1 {record['top1']:.2f} % at {record['avg_macs'] / 1e6:.3g} M MACs on average"
            )
        return record

    def deployed_cost(self, input_size: tuple[int, int, int]) -> dict[str, Any]:
        """The deploy form's cost, plus the test-time early exit at the val thresholds under
        `s2dnas_thresholds` once a test loop has run (results.json)."""
        cost = super().deployed_cost(input_size)
        if self.inference is not None:
            cost["s2dnas_thresholds"] = self.inference
        return cost
