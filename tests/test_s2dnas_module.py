"""The S2DNAS LightningModule: config, loss, state, static initialisation and the search schedule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from dynlab.backbones import create_backbone
from dynlab.building import build_datamodule, build_module
from dynlab.config import BackboneConfig
from dynlab.data.base import DataInfo
from dynlab.results import read_results
from dynlab.runner import run_job
from dynlab.techniques.s2dnas.config import S2DNASConfig, S2DNASSearchConfig
from dynlab.techniques.s2dnas.layers import StageRun
from dynlab.techniques.s2dnas.module import S2DNASModule
from dynlab.techniques.s2dnas.settings import SettingsError
from tests.conftest import TINY, technique_config

DIGITS = DataInfo("digits", 10, (3, 32, 32))
RESNET20 = BackboneConfig(name="cifar_resnet20")


def s2dnas(backbone: BackboneConfig = RESNET20, **fields: Any) -> S2DNASModule:
    """An S2DNAS module for digits from its typed config: the schema's defaults with `fields`."""
    return S2DNASModule(technique_config(S2DNASConfig, **fields), backbone, DIGITS)


def test_config_builds_the_module_and_bad_settings_fail_before_training(compose_cfg) -> None:
    cfg = compose_cfg(["technique=s2dnas", "dataset=digits", "technique.num_stages=2"])
    module = build_module(cfg, build_datamodule(cfg))
    assert isinstance(module, S2DNASModule) and module.model.num_stages == 2
    assert module.model.settings.split_points == ((4,), (4,), (4,))  # equal split of G=8
    cfg = compose_cfg(["technique=s2dnas", "dataset=digits", "technique.split_points=[[6,3]]"])
    with pytest.raises(SettingsError, match="strictly increasing"):
        build_module(cfg, build_datamodule(cfg))


@pytest.mark.parametrize("preset", ["digits", "resnet56_cifar10", "resnet56_cifar100"])
def test_presets_compose_into_valid_s2dnas_configs(compose_cfg, preset: str) -> None:
    cfg = compose_cfg([f"+experiment=s2dnas/{preset}"], config_name="search")
    technique = OmegaConf.to_object(cfg.technique)  # runs the schema's own checks
    assert isinstance(technique, S2DNASConfig) and technique.num_stages >= 2
    assert cfg.expected.paper and cfg.expected.dynlab
    # the paper's shape: the paper-scale searches start from a trained static model
    assert technique.search.require_static is (preset != "digits")


def test_exit_losses_weight_each_exit() -> None:
    module = s2dnas(loss_weights=[0.0, 0.5, 2.0])
    logits = [torch.randn(4, 10) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3])
    expected = 0.5 * F.cross_entropy(logits[1], y) + 2.0 * F.cross_entropy(logits[2], y)
    torch.testing.assert_close(module.exit_losses(logits, y), expected)
    with pytest.raises(ValueError, match="2 loss_weights for 3 stages"):
        s2dnas(loss_weights=[1.0, 1.0])


def test_technique_state_rebuilds_the_network_before_its_weights_load() -> None:
    trained = s2dnas(split_points=[[1, 3]], concat=[[False], [True]]).eval()
    fresh = s2dnas().eval()
    fresh.load_technique_state(trained.technique_state())
    fresh.load_state_dict(trained.state_dict())
    assert fresh.model.settings == trained.model.settings
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh.forward_exits(x), trained.forward_exits(x))


def test_init_from_a_static_checkpoint_slices_its_weights(tmp_path: Path) -> None:
    static = create_backbone("cifar_resnet20", num_classes=10, in_chans=3).eval()
    path = tmp_path / "baseline.ckpt"
    torch.save({"state_dict": {f"model.net.{k}": v for k, v in static.state_dict().items()}}, path)
    x = torch.randn(2, 3, 32, 32)
    one_stage = s2dnas(num_stages=1, init_from=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(one_stage(x), static(x), rtol=1e-5, atol=1e-5)
    three = s2dnas(init_from=str(path), split_points=[[2, 5]])
    stem = three.model.backbone.stem[0]
    torch.testing.assert_close(
        stem.weights[1], static.stem[0].weight[4:10]
    )  # stage 2: groups 2..4 of 16
    with pytest.raises(ValueError, match="do not fit backbone cifar_resnet32"):
        s2dnas(BackboneConfig(name="cifar_resnet32"), init_from=str(path))


def test_search_schedule_runs_end_to_end_and_keeps_the_best_retrained_network(
    compose_cfg, tmp_path: Path
) -> None:
    overrides = [
        *TINY,
        "technique=s2dnas",
        "technique.num_stages=2",
        "technique.groups=4",
        "technique.search.iterations=1",
        "technique.search.candidates_per_iteration=2",
        "technique.search.candidate_batches=1",
        "technique.search.top_k=2",
        "evaluation.budgeted=false",
    ]
    cfg = compose_cfg(overrides, config_name="search", run_dir=tmp_path / "run")
    run_job(cfg)
    run = Path(cfg.run_dir)
    selection = json.loads((run / "checkpoints" / "select" / "selection.json").read_text())
    assert set(selection["retrained"]) == {"retrain_1", "retrain_2"}
    best = max(selection["retrained"], key=lambda p: selection["retrained"][p]["reward"])
    assert selection["selected"] == best
    final = torch.load(run / "checkpoints" / "select" / "final.ckpt", weights_only=False)
    assert final["dynlab"]["technique"]["settings"] == selection["retrained"][best]["settings"]
    assert len(json.loads((run / "checkpoints" / "search" / "candidates.json").read_text())) == 2
    assert read_results(run)["status"] == "completed"


def test_search_needs_more_than_one_stage() -> None:
    module = s2dnas(num_stages=1, search=S2DNASSearchConfig())
    assert [p.name for p in module.phases("train")] == ["train"]
    with pytest.raises(ValueError, match="num_stages >= 2"):
        module.phases("search")


def test_exits_read_their_own_stage_or_all_earlier_stages() -> None:
    """`own` (the paper's per-stage classifiers): exit k reads stage k's pooled features only, so
    its head is as wide as stage k's last map; `all`: stages 1..k. The last head starts from the
    static classifier's columns in both."""
    static = create_backbone("cifar_resnet20", num_classes=10, in_chans=3)
    own = s2dnas(split_points=[[2, 5]]).model
    every = s2dnas(split_points=[[2, 5]], exit_features="all").model
    bounds = own.plan.out_bounds  # 64 channels cut at groups 2 and 5 of 8: 16, 24, 24
    assert [h.in_features for h in own.heads] == [hi - lo for lo, hi in bounds] == [16, 24, 24]
    assert [h.in_features for h in every.heads] == [16, 40, 64]
    assert own.exit_macs((3, 32, 32))[0] < every.exit_macs((3, 32, 32))[-1]
    one = s2dnas(num_stages=1, exit_features="own").model
    assert one.heads[0].in_features == static.get_classifier().in_features
    # exit 2 of `own` ignores stage 1's pooled features: perturbing them leaves it unchanged
    run = StageRun(torch.randn(2, 3, 32, 32))
    own.eval()
    with torch.no_grad():
        own._advance(run)
        run.pooled[0] = run.pooled[0] + 100.0
        _, logits = own._advance(run)
        run2 = StageRun(run.image)
        own._advance(run2)
        torch.testing.assert_close(own._advance(run2)[1], logits)


def test_checkpoints_from_before_per_stage_exits_load_as_all(tmp_path: Path) -> None:
    old = s2dnas(split_points=[[2, 5]], exit_features="all").eval()
    state = old.technique_state()
    del state["exit_features"]  # what a checkpoint written before the option holds
    fresh = s2dnas().eval()
    fresh.load_technique_state(state)
    fresh.load_state_dict(old.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh.forward_exits(x), old.forward_exits(x))


def test_a_search_that_needs_a_static_model_is_refused_without_one(tmp_path: Path) -> None:
    search = S2DNASSearchConfig(require_static=True)
    module = s2dnas(search=search)
    with pytest.raises(ValueError, match="technique.init_from=<static run>"):
        module.check_run(OmegaConf.create({"mode": "search"}))
    module.check_run(OmegaConf.create({"mode": "train"}))  # training given settings: no search
    static = create_backbone("cifar_resnet20", num_classes=10, in_chans=3)
    torch.save(static.state_dict(), tmp_path / "static.pt")
    with_static = s2dnas(search=search, init_from=str(tmp_path / "static.pt"))
    with_static.check_run(OmegaConf.create({"mode": "search"}))
