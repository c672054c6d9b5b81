"""technique=sfr: the drop schedule, a short digits run to a condensed model, exact resume between
drops, and settings that cannot work refused before training."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from dynlab import checkpointing as ckpt
from dynlab import runner
from dynlab.backbones import create_backbone
from dynlab.evaluation.macs import count_macs
from dynlab.preemption import Preempted, PreemptionHandler
from dynlab.runner import build_trainer, phase_data, run_job, schedule
from dynlab.techniques.sfr.module import (
    SparseNet,
    SparsificationIncomplete,
    drops_due,
    sparse_backbones,
    sparse_layers,
)
from dynlab.validation import ConfigError, build_run, validate_config

from .conftest import TINY_RUN

# The tiny CondenseNetV2 on digits: 10 epochs (3 drops in the first half) of 16 batches.
SFR_DIGITS = [
    *TINY_RUN,
    "technique=sfr",
    "backbone=cifar_condensenetv2_tiny",
    "dataset=digits",
    "dataset.batch_size=32",
    "trainer.max_epochs=10",
    "trainer.limit_train_batches=16",
    "evaluation.budgeted=false",
]


def test_drops_follow_the_official_stage_boundaries():
    # Official LGC._check_drop with C = 8 over 350 epochs: drops at epochs 25, 50, ..., 175.
    steps_per_epoch, epochs = 10, 350
    total = steps_per_epoch * epochs
    first_due = [
        next(s for s in range(total) if drops_due(s, total, 7, 0.5) >= k) // steps_per_epoch
        for k in range(1, 8)
    ]
    assert first_due == [25, 50, 75, 100, 125, 150, 175]
    assert drops_due(total - 1, total, 7, 0.5) == 7 and drops_due(0, total, 7, 0.5) == 0
    # A run resumed far ahead owes every drop in between, not one.
    assert drops_due(total // 2, total, 7, 0.5) - drops_due(total // 8, total, 7, 0.5) == 6


def _final(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt.phase_dir(run, "train") / ckpt.FINAL, weights_only=False)


@pytest.mark.slow
def test_a_digits_run_makes_every_drop_and_its_condensed_model_scores_the_same(
    compose_cfg, tmp_path
):
    overrides = [*SFR_DIGITS, "++technique.phases={train: {ema: {decay: 0.9}}}"]
    cfg = compose_cfg(overrides, run_dir=tmp_path)
    top1 = run_job(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    drops = results["sparsification"]
    assert [d["stage"] for d in drops] == [1, 2, 3] and drops[-1]["lgc_density"] < drops[0][
        "lgc_density"
    ]

    # The masked model of the final checkpoint: binary masks (EMA copied them), every drop made.
    data, module = build_run(cfg)
    ckpt.load_module_state(module, ckpt.phase_dir(tmp_path, "train") / ckpt.FINAL)
    for name, layer in sparse_layers(module.model.net):
        assert int(layer.drop_stage) == layer.stages, name
        assert set(layer.mask.unique().tolist()) <= {0.0, 1.0}, name
    # Its test accuracy, masked, equals the condensed model's (what run_job reported).
    data.setup("test")
    masked = module.model.eval()
    correct = count = 0
    with torch.no_grad():
        for x, y in data.test_dataloader():
            correct += int((masked(x).argmax(1) == y).sum())
            count += len(y)
    assert 100 * correct / count == pytest.approx(top1, abs=1e-4)
    assert top1 > 40.0  # learning (chance: 10 %), so the agreement above means something
    masked_params = sum(p.numel() for p in module.model.parameters())
    assert results["params"] < masked_params and results["exit_macs"][0] < results["masked_macs"][0]


class _SignalAfterFirstDrop(PreemptionHandler):
    """The real handler, plus SIGUSR1 at the first step after the module's first drop."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if len(pl_module.drop_history) == 1 and not getattr(self, "_sent", False):
            self._sent = True
            os.kill(os.getpid(), signal.SIGUSR1)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


@pytest.mark.slow
def test_a_run_killed_between_drops_resumes_with_the_same_masks(compose_cfg, tmp_path, monkeypatch):
    run_job(compose_cfg(SFR_DIGITS, run_dir=tmp_path / "straight"))
    with monkeypatch.context() as patch:
        patch.setattr(runner, "PreemptionHandler", _SignalAfterFirstDrop)
        with pytest.raises(Preempted):
            run_job(compose_cfg(SFR_DIGITS, run_dir=tmp_path / "cut"))
    # Between drops the checkpoint is not convertible, and says why.
    cfg = compose_cfg(SFR_DIGITS, run_dir=tmp_path / "cut")
    _, module = build_run(cfg)
    ckpt.load_module_state(module, ckpt.phase_dir(tmp_path / "cut", "train") / ckpt.LAST)
    assert [int(m.drop_stage) for _, m in sparse_layers(module.model.net)][0] == 1
    with pytest.raises(SparsificationIncomplete, match=r"incomplete .* \(1 of 3 drops\)"):
        module.deploy()
    run_job(cfg)
    straight, cut = _final(tmp_path / "straight"), _final(tmp_path / "cut")
    for name, value in straight["state_dict"].items():
        assert torch.equal(value, cut["state_dict"][name]), name
    assert straight["dynlab"]["technique"] == cut["dynlab"]["technique"]  # the drop history


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_epochs=5"], "5 training epochs are fewer than the 6 .*trainer.max_epochs=6"),
        (["+backbone.kwargs.condense_factor=3"], "in_channels=16 is not divisible by condense"),
        (["+backbone.kwargs.sparse_factor=5"], "out_channels=16 is not divisible by sparse_factor"),
        (
            ["backbone=cifar_resnet20"],
            "cifar_resnet20 is none: set backbone.name to .*cifar_condensenetv2_110",
        ),
    ],
)
def test_settings_the_schedule_cannot_use_are_refused_before_training(
    compose_cfg, overrides, message
):
    with pytest.raises(ConfigError, match=message):
        build_run(compose_cfg([*SFR_DIGITS, *overrides]))


@pytest.mark.parametrize("name", sparse_backbones())
def test_every_sparse_backbone_converts_to_the_same_outputs_at_lower_cost(name):
    """Converted outputs equal the masked model's (eval mode) to 1e-5, for every
    architecture; parameters and MACs drop."""
    torch.manual_seed(0)
    cifar = name.startswith("cifar_")
    size = (3, 32, 32) if cifar else (3, 224, 224)
    net = SparseNet(create_backbone(name, num_classes=10 if cifar else 1000)).eval()
    for _, layer in sparse_layers(net.net):
        for _ in range(layer.stages):
            layer.drop()
    x = torch.randn(2 if cifar else 1, *size)
    deployed = net.deploy()
    assert not sparse_layers(deployed.net)
    with torch.no_grad():
        masked, condensed = net(x), deployed(x)
    scale = float(masked.abs().max().clamp(min=1.0))
    torch.testing.assert_close(condensed, masked, rtol=0, atol=1e-5 * scale)
    assert sum(p.numel() for p in deployed.parameters()) < sum(p.numel() for p in net.parameters())
    assert count_macs(deployed, size) < count_macs(net, size)


@pytest.mark.parametrize(
    "preset",
    ["digits", "cifar_110_cifar10", "cifar_146_cifar100", "imagenet_a", "imagenet_b", "imagenet_c"],
)
def test_presets_compose_and_validate(compose_cfg, preset):
    cfg = compose_cfg([f"+experiment=condensenetv2/{preset}"])
    validate_config(cfg)
    assert cfg.technique.name == "sfr" and cfg.expected.paper and cfg.expected.dynlab


def test_a_run_that_skipped_stages_catches_up_on_every_missed_drop(compose_cfg, monkeypatch):
    """The official `_check_drop` drops once however many stages progress skipped; here a step
    far into the schedule owes, and makes, every drop due by then, recorded as one event."""
    _, module = build_run(compose_cfg(SFR_DIGITS))
    monkeypatch.setattr(type(module), "_total_steps", lambda self: 100)
    monkeypatch.setattr(type(module), "log", lambda self, *args, **kwargs: None)
    module.sparsify(10)  # nothing due before step 100 * 0.5 / 3
    assert module.drop_history == []
    module.sparsify(34)  # two drops due (at 16.7 and 33.3): both made now
    assert [int(m.drop_stage) for _, m in module.layers] == [2] * len(module.layers)
    module.sparsify(99)
    assert all(int(m.drop_stage) == m.stages == 3 for _, m in module.layers)
    assert [r["stage"] for r in module.drop_history] == [2, 3]
    assert module.drop_history[-1]["lgc_density"] == pytest.approx(0.25)


def test_a_fit_stopped_early_still_makes_every_drop_at_its_end(compose_cfg):
    """A fit that stops after one step (a smoke run, a step budget) makes its missing drops in
    on_train_end, where Lightning refuses `self.log`: recorded, not logged as metrics."""
    cfg = compose_cfg(SFR_DIGITS)
    datamodule, module = build_run(cfg)
    phase = schedule(module, cfg)[0]
    module.start_phase(phase)

    class StopAfterOneStep(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            trainer.should_stop = True

    with phase_data(module, datamodule, phase):
        trainer = build_trainer(cfg, phase, False, [StopAfterOneStep()], module)
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    assert all(int(m.drop_stage) == m.stages for _, m in module.layers)
    assert module.drop_history[-1]["lgc_density"] == pytest.approx(0.25)
