"""The train/evaluate apps end to end on tiny configs: composition, bad input, fit, resume, DDP, multirun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ValidationError

from dynlab import checkpointing as ckpt
from dynlab.backbones import UnknownBackboneError
from dynlab.data.base import DataRootError
from dynlab.runner import build_datamodule, build_module, run_job, validate_config

from .conftest import REPO, TINY, run_cli

BACKBONES = sorted(p.stem for p in (REPO / "conf/backbone").glob("*.yaml"))
TECHNIQUES = sorted(p.stem for p in (REPO / "conf/technique").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (REPO / "conf/dataset").glob("*.yaml"))


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_combination_composes_and_validates(compose_cfg, technique, backbone, dataset):
    cfg = compose_cfg([f"technique={technique}", f"backbone={backbone}", f"dataset={dataset}"])
    validate_config(cfg)
    assert cfg.technique.name == technique and cfg.dataset.name == dataset


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("backbone", ["cifar_resnet20", "cifar_mobilenetv2", "cifar_vgg16_bn", "timm"])
def test_every_technique_builds_on_backbones(compose_cfg, technique, backbone):
    cfg = compose_cfg([*TINY, f"technique={technique}", f"backbone={backbone}"])
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
        ("+dataset.colour=red", ConfigCompositionException, "colour"),
        ("dataset=mnist", MissingConfigException, "digits"),
        ("backbone=resnet9000", MissingConfigException, "cifar_resnet56"),
    ],
)
def test_bad_overrides_fail_at_composition(compose_cfg, override, exception, message):
    with pytest.raises(exception) as err:
        compose_cfg([override])
    text = str(err.value) + str(err.value.__cause__ or "")
    assert message in text


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
    for name in ("last.ckpt", "best.ckpt", "final.ckpt", "done"):
        assert (ckpt.phase_dir(run, "train") / name).exists(), name
    final = ckpt.phase_dir(run, "train") / "final.ckpt"
    stamp = final.stat().st_mtime_ns
    # The same command again: the phase is done, so only the evaluation runs, with the same answer.
    assert run_job(compose_cfg([*TINY, "trainer.max_epochs=2"], run_dir=run)) == pytest.approx(top1)
    assert final.stat().st_mtime_ns == stamp
