"""The train/evaluate apps end to end on tiny configs: composition, bad input, fit, resume, DDP, multirun."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ValidationError

from dynlab import checkpointing as ckpt
from dynlab import runner
from dynlab.apps._hydra import CONFIG_DIR
from dynlab.backbones import UnknownBackboneError, backbone_capabilities, list_backbones
from dynlab.building import build_datamodule, build_module
from dynlab.data.base import DataRootError
from dynlab.preemption import Preempted, PreemptionHandler
from dynlab.runner import run_job
from dynlab.traits import technique_traits
from dynlab.validation import ConfigError, validate_config

from .conftest import TINY

BACKBONES = sorted(p.stem for p in (Path(CONFIG_DIR) / "backbone").glob("*.yaml"))
TECHNIQUES = sorted(p.stem for p in (Path(CONFIG_DIR) / "technique").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (Path(CONFIG_DIR) / "dataset").glob("*.yaml"))
# What a technique needs beyond its defaults to build on 32x32 images (GFNet's default patch is
# ImageNet's 96x96, larger than the image: refused, see tests/test_gfnet.py).
SMALL_IMAGES = {"gfnet": ["technique.patch_size=16", "technique.T=3"]}
# Combinations that cannot work at that size, and the message that says so before training.
REFUSED = {("gfnet", "cifar_vgg16_bn"): "cannot take 16x16 patches"}  # 5 max-pools need >= 32
# SFR prunes LGC/SFR layers, which none of these backbones has (tests/test_sfr.py runs it).
REFUSED |= {
    ("sfr", b): "needs a network of LGC/SFR layers"
    for b in ("cifar_resnet20", "cifar_mobilenetv2", "cifar_vgg16_bn", "timm")
}
# SPOS, AngleNAS, FBNetV2 and MetaPruning search their own supernets (tests/test_spos.py,
# tests/test_anglenas.py, tests/test_fbnetv2.py, tests/test_metapruning.py).
REFUSED |= {
    (t, b): message
    for t, message in (
        ("spos", "needs an SPOS one-shot supernet"),
        ("anglenas", "needs an SPOS one-shot supernet"),
        ("fbnetv2", "needs a DMaskingNAS supernet"),
        ("metapruning", "needs a MetaPruning PruningNet"),
    )
    for b in ("cifar_resnet20", "cifar_mobilenetv2", "cifar_vgg16_bn", "timm")
}


# Every pair of choices composes and validates: backbones bring technique defaults (their
# optimiser), datasets and techniques meet in the schemas' checks. All pairs, not the full product
# (420 runs of about 0.15 s), so the 2-core CI keeps room for the techniques to come.
PAIRS = sorted(
    {(t, b, "digits") for t in TECHNIQUES for b in BACKBONES}
    | {(t, "cifar_resnet20", d) for t in TECHNIQUES for d in DATASETS}
    | {("s2dnas", b, d) for b in BACKBONES for d in DATASETS}
)


@pytest.mark.parametrize(("technique", "backbone", "dataset"), PAIRS)
def test_every_pair_of_choices_composes_and_validates(compose_cfg, technique, backbone, dataset):
    cfg = compose_cfg([f"technique={technique}", f"backbone={backbone}", f"dataset={dataset}"])
    needs = technique_traits(technique).needs
    # dynlab's own backbones are refused before building, from what they declare; any other model
    # (backbone=timm) when the technique's module sees the built network
    # (test_every_technique_builds_on_backbones).
    declared = cfg.backbone.name in list_backbones()
    if needs is not None and declared and needs not in backbone_capabilities(cfg.backbone.name):
        with pytest.raises(ConfigError, match=f"as its backbone and {cfg.backbone.name} is none"):
            validate_config(cfg)
        return
    validate_config(cfg)
    assert cfg.technique.name == technique and cfg.dataset.name == dataset


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize(
    "backbone", ["cifar_resnet20", "cifar_mobilenetv2", "cifar_vgg16_bn", "timm"]
)
def test_every_technique_builds_on_backbones(compose_cfg, technique, backbone):
    overrides = [*TINY, f"technique={technique}", *SMALL_IMAGES.get(technique, [])]
    cfg = compose_cfg([*overrides, f"backbone={backbone}"])
    if (technique, backbone) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[technique, backbone]):
            build_module(cfg, build_datamodule(cfg))
        return
    module = build_module(cfg, build_datamodule(cfg))
    logits = module.forward_exits(torch.randn(2, 3, 32, 32))
    assert all(t.shape == (2, 10) for t in logits)
    macs = module.exit_macs((3, 32, 32))
    assert len(macs) == len(logits) and macs == sorted(macs) and macs[0] > 0


@pytest.mark.parametrize(
    ("override", "exception", "message"),
    [
        ("trainer.max_epoch=1", ConfigCompositionException, "max_epoch"),
        ("dataset.batch_size=many", ConfigCompositionException, "batch_size"),
        ("technique.optim.name=rmsprop", ConfigCompositionException, "rmsprop"),
        ("dataset.colour=red", ConfigCompositionException, "colour"),
        ("dataset=mnist", MissingConfigException, "digits"),
        ("backbone=resnet9000", MissingConfigException, "cifar_resnet56"),
    ],
)
def test_bad_overrides_fail_at_composition(compose_cfg, override, exception, message):
    with pytest.raises(exception) as err:
        compose_cfg([override])
    text = str(err.value) + str(err.value.__cause__ or "")
    assert message in text


def test_forced_unknown_key_fails_before_training(compose_cfg):
    cfg = compose_cfg([*TINY, "+dataset.colour=red"])
    with pytest.raises(Exception, match="colour"):
        build_datamodule(cfg)


def test_wrong_type_in_a_group_file_is_a_validation_error(compose_cfg):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_cfg(["trainer.num_nodes=two"])


def test_unknown_timm_backbone_lists_valid_names(compose_cfg):
    cfg = compose_cfg(["backbone=timm", "backbone.name=resnet_fifty"])
    with pytest.raises(UnknownBackboneError) as err:
        validate_config(cfg)
    assert "cifar_resnet56" in str(err.value) and "timm.list_models()" in str(err.value)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "imagenet"])
def test_missing_data_root_says_where_to_put_data(compose_cfg, tmp_path, dataset):
    cfg = compose_cfg([f"dataset={dataset}", f"dataset.root={tmp_path / 'nowhere'}"])
    with pytest.raises(DataRootError) as err:
        build_datamodule(cfg)
    assert "dataset.root=" in str(err.value) and str(tmp_path / "nowhere") in str(err.value)


def test_cpu_devices_without_ddp_fail_before_training(compose_cfg):
    cfg = compose_cfg([*TINY, "trainer.devices=2"])
    with pytest.raises(ValueError, match="ddp_cpu"):
        validate_config(cfg)


def test_fit_writes_run_dir_and_rerun_resumes_nothing_twice(compose_cfg, tmp_path):
    cfg = compose_cfg([*TINY, "trainer.max_epochs=2"])
    top1 = run_job(cfg)
    run = Path(cfg.run_dir)
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["technique"] == "baseline"
    assert results["metrics"]["test/top1"] == pytest.approx(top1)
    assert results["params"] > 200_000 and len(results["exit_macs"]) == 1
    assert len(results["anytime"]) == 1 and results["budgeted"]["curve"]
    assert (run / "plots/anytime.png").exists() and (run / "plots/budgeted.png").exists()
    for name in ("last.ckpt", "final.ckpt", "done"):
        assert (ckpt.phase_dir(run, "train") / name).exists(), name
    # Nothing reads a "best" checkpoint, so none is written (test data never selects a model).
    assert sorted(p.name for p in ckpt.phase_dir(run, "train").glob("*best*")) == []
    final = ckpt.phase_dir(run, "train") / "final.ckpt"
    stamp = final.stat().st_mtime_ns
    # The same command again: the phase is done, so only the evaluation runs, with the same answer.
    assert run_job(compose_cfg([*TINY, "trainer.max_epochs=2"], run_dir=run)) == pytest.approx(top1)
    assert final.stat().st_mtime_ns == stamp


class _SignalAtStep3(PreemptionHandler):
    """The real handler, plus a SIGTERM to this process at step 3 (as Slurm's preemption sends)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def test_preempted_run_resumes_to_identical_weights(compose_cfg, tmp_path, monkeypatch):
    overrides = [*TINY, "dataset.num_train=160", "trainer.max_epochs=2"]
    assert run_job(compose_cfg(overrides, run_dir=tmp_path / "full")) is not None

    with monkeypatch.context() as patch:
        patch.setattr(runner, "PreemptionHandler", _SignalAtStep3)
        with pytest.raises(Preempted):
            run_job(compose_cfg(overrides, run_dir=tmp_path / "cut"))
    stopped = torch.load(
        ckpt.phase_dir(tmp_path / "cut", "train") / "last.ckpt", weights_only=False
    )
    assert stopped["global_step"] == 3 and stopped["epoch"] == 0
    assert not ckpt.is_done(tmp_path / "cut", "train")
    # Rerunning the same command continues mid-epoch and lands on the same weights and metrics.
    run_job(compose_cfg(overrides, run_dir=tmp_path / "cut"))
    full, resumed = (
        torch.load(ckpt.phase_dir(tmp_path / run, "train") / "final.ckpt", weights_only=False)
        for run in ("full", "cut")
    )
    assert full["global_step"] == resumed["global_step"] == 8
    for name, tensor in full["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    metrics = [
        json.loads((tmp_path / r / "results.json").read_text())["metrics"] for r in ("full", "cut")
    ]
    assert metrics[0] == metrics[1]
