"""The runner's schedule: a phase started alone from a given checkpoint (`phase=`, `ckpt_path=`)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from dynlab import checkpointing as ckpt
from dynlab.building import build_datamodule, build_module
from dynlab.runner import restore_finished_phases, run_job, schedule
from dynlab.validation import ConfigError

from .conftest import TINY


def test_a_fresh_run_starts_from_ckpt_path_and_a_resume_ignores_it(compose_cfg, tmp_path):
    first = compose_cfg(TINY, run_dir=tmp_path / "first")
    run_job(first)
    final = ckpt.phase_dir(first.run_dir, "train") / ckpt.FINAL
    trained = torch.load(final, map_location="cpu", weights_only=False)["state_dict"]

    cfg = compose_cfg([*TINY, f"ckpt_path={final}", "seed=1"], run_dir=tmp_path / "second")
    pl.seed_everything(1)
    module = build_module(cfg, build_datamodule(cfg))
    restore_finished_phases(module, cfg)
    for name, value in module.state_dict().items():
        assert torch.equal(value, trained[name]), name

    # Once the run's own phase finished, a rerun continues from it, not from ckpt_path.
    run_job(cfg)
    own = torch.load(
        ckpt.phase_dir(cfg.run_dir, "train") / ckpt.FINAL, map_location="cpu", weights_only=False
    )["state_dict"]
    module = build_module(cfg, build_datamodule(cfg))
    restore_finished_phases(module, cfg)
    assert torch.equal(
        module.state_dict()["model.net.stem.0.weight"], own["model.net.stem.0.weight"]
    )
    assert not torch.equal(own["model.net.stem.0.weight"], trained["model.net.stem.0.weight"])


def test_phase_selects_one_phase_and_names_the_others_when_unknown(compose_cfg):
    cfg = compose_cfg([*TINY, "phase=train"])
    module = build_module(cfg, build_datamodule(cfg))
    assert [p.name for p in schedule(module, cfg)] == ["train"]
    bad = compose_cfg([*TINY, "phase=retrain_9"])
    with pytest.raises(
        ConfigError, match="phase=retrain_9: the train schedule has the phases train"
    ):
        schedule(module, bad)
