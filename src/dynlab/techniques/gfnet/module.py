"""`technique=gfnet`: GFNet's training schedule over any CNN backbone (Wang et al., NeurIPS 2020).

The official three stages (train.py, `--train_stage`) are phases of one run, each resumable:
  [glance]  only when the glance encoder is not trained with the rest (MobileNet/EfficientNet):
            fine-tune it alone on PxP glances; it stays frozen afterwards (official issue #4);
  stage_1   random patch locations; train the local encoder, the classifier (and the glance
            encoder) with (1/T) sum_t [CE(f_C at t) + lambda CE(encoder's own head at t)];
  stage_2   encoders and classifier frozen (eval mode, so even BatchNorm statistics stay); the
            patch policy trained by PPO (`ppo.py`);
  stage_3   policy frozen; fine-tune the local encoder and classifier with the stage-1 loss on the
            locations the policy samples.
Optimisers and epochs are the phases' recipes (dynlab/conf/technique/gfnet.yaml: the official values).
"""

from __future__ import annotations

from typing import Any, Self

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn
from torchmetrics import MeanMetric

from dynlab.checkpointing import load_static_weights
from dynlab.config import BackboneConfig
from dynlab.data.base import DataInfo
from dynlab.techniques.base import DynlabModule, Phase, dataset_backbone
from dynlab.techniques.gfnet.config import GFNetConfig
from dynlab.techniques.gfnet.model import GFNet, Locate, StepOutput
from dynlab.techniques.gfnet.plots import patch_sequences
from dynlab.techniques.gfnet.ppo import episode, ppo_loss, true_class_confidence

GLANCE, STAGE_1, STAGE_2, STAGE_3 = "glance", "stage_1", "stage_2", "stage_3"
# How each phase picks the focus locations while training.
TRAIN_LOCATIONS = {STAGE_1: Locate.random, STAGE_2: Locate.sample, STAGE_3: Locate.sample}


class GFNetModule(DynlabModule):
    """GFNet on two copies of the backbone, trained in the official three stages."""

    phase_names = GFNetConfig.PHASES
    config: GFNetConfig

    def __init__(self, config: GFNetConfig, backbone: BackboneConfig, data_info: DataInfo) -> None:
        super().__init__(config, backbone)
        _, h, w = data_info.input_size
        if config.patch_size >= min(h, w):
            raise ValueError(
                f"technique.patch_size={config.patch_size} is not smaller than {data_info.name}'s "
                f"{h}x{w} images: the glance sees the whole image at PxP and a focus patch is a "
                f"part of it; set technique.patch_size below {min(h, w)} (e.g. {min(h, w) // 2})"
            )
        nets = [dataset_backbone(backbone, data_info) for _ in range(2)]
        init_from = config.init_from
        for net, path in zip(nets, (config.glance_init_from or init_from, init_from), strict=True):
            if path:
                net.load_state_dict(load_static_weights(path))
        self.model = GFNet(
            *nets,
            num_classes=data_info.num_classes,
            input_size=data_info.input_size,
            patch_size=config.patch_size,
            steps=config.T,
            interpolation=config.glance_interpolation,
            classifier=config.classifier,
            classifier_hidden=config.classifier_hidden,
            policy_encoder=config.policy_encoder,
            policy_hidden=config.policy_hidden,
            policy_width=config.policy_width,
            policy_conv_channels=config.policy_conv_channels,
            action_std=config.action_std,
        )
        self._idle: list[nn.Module] = []  # parts kept in eval mode during the current phase

    # --- phases -------------------------------------------------------------------------------
    def phases(self, mode: str) -> list[Phase]:
        if mode != "train":
            return super().phases(mode)
        glance_ready = self.config.train_glance or self.config.glance_init_from
        schedule = [] if glance_ready else [Phase(GLANCE)]
        schedule.append(Phase(STAGE_1))
        if self.model.policy is not None:  # T = 1: a glance alone has no patch to choose
            schedule += [Phase(STAGE_2), Phase(STAGE_3)]
        return schedule

    def start_phase(self, phase: Phase) -> None:
        """Freeze what the stage does not train; frozen encoders and classifier stay in eval mode."""
        super().start_phase(phase)
        m = self.model
        fine_tuned = [m.local, m.classifier, *([m.glance] if self.config.train_glance else [])]
        trains = {GLANCE: [m.glance], STAGE_1: fine_tuned, STAGE_2: [m.policy], STAGE_3: fine_tuned}
        trained = trains[phase.name]
        parts = [m.glance, m.local, m.classifier, *([m.policy] if m.policy is not None else [])]
        for part in parts:
            part.requires_grad_(any(part is t for t in trained))
        # The policy has no BatchNorm or dropout; the encoders and the classifier do.
        self._idle = [p for p in parts[:3] if not any(p is t for t in trained)]
        self.train(self.training)

    def train(self, mode: bool = True) -> Self:
        """Lightning's train() leaves the parts the phase does not train in eval mode (official
        train.py: model.eval() etc. in stage 2, model_prime.eval() when it is not trained)."""
        super().train(mode)
        if mode:
            for part in getattr(self, "_idle", []):
                part.eval()
        return self

    # --- training -----------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.current_phase == GLANCE:
            glance = self.model.glance
            logits = glance.own_logits(glance(self.model.glimpse(x))[0])
            loss = F.cross_entropy(logits, y, label_smoothing=self.config.optim.label_smoothing)
            self._log_train(loss, [logits], y)
            return loss
        locate = TRAIN_LOCATIONS[self.current_phase or STAGE_1]
        if self.current_phase == STAGE_2:
            with torch.no_grad():
                steps = self.model.rollout(x, locate)
            loss, stats = ppo_loss(self.model.policy, episode(steps, y), self.config.ppo)
            self.log("train/reward", stats["reward"], prog_bar=True)
            self.log("train/ppo_ratio", stats["ratio"])
        else:
            steps = self.model.rollout(x, locate, own_head=True)
            loss = self.stage_loss(steps, y)
        self._log_train(loss, [s.logits for s in steps], y)
        return loss

    def stage_loss(self, steps: list[StepOutput], y: Tensor) -> Tensor:
        """(1/T) sum_t [CE(f_C at t) + lambda CE(encoder's own head at t)] (official train.py)."""
        ls = self.config.optim.label_smoothing
        total = sum(
            F.cross_entropy(s.logits, y, label_smoothing=ls)
            + self.config.dsn_weight * F.cross_entropy(s.own_logits, y, label_smoothing=ls)  # type: ignore[arg-type]
            for s in steps
        )
        return total / len(steps)  # type: ignore[return-value]

    def _log_train(self, loss: Tensor, logits: list[Tensor], y: Tensor) -> None:
        self.log("train/loss", loss, prog_bar=True)
        top1 = self._accuracy("train/top1", logits[-1].shape[1], k=1)
        top1(logits[-1].detach(), y)
        self._log_metric("train/top1", top1, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Every exit on the policy's mean locations, and next to it the same network on seeded
        random locations with the mean confidence gain of each: what the policy adds."""
        super().validation_step(batch, batch_idx)
        if self.model.policy is None:
            return
        x, y = batch
        generator = torch.Generator(device=x.device).manual_seed(batch_idx)
        for name, steps in (
            ("", self.model.rollout(x)),
            ("_random", self.model.rollout(x, Locate.random, generator=generator)),
        ):
            confidence = true_class_confidence(steps, y)
            gain = self._metric(f"val/reward{name}", MeanMetric)
            gain.update(confidence[-1] - confidence[0])
            self._log_metric(f"val/reward{name}", gain)
            if name:
                top1 = self._accuracy(f"val/top1{name}", steps[-1].logits.shape[1], k=1)
                top1.update(steps[-1].logits, y)
                self._log_metric(f"val/top1{name}", top1)

    # --- pictures -----------------------------------------------------------------------------
    def evaluation_figures(self, model: nn.Module, datamodule: Any) -> dict[str, Figure]:
        """plots/patches.png: the patch sequence on a few test images, each step's confidence."""
        x, y = next(iter(datamodule.test_dataloader()))
        return {"patches": patch_sequences(model, x[:8], y[:8])}
