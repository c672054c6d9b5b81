"""What the weight-sharing searches share (techniques/supernet.py): one name for a given
architecture (`technique.architecture`, `_file`) with the older SPOS and FBNetV2 names still
loading under a one-line deprecation note, one check of a saved supernet's space, one state
format; search results and checkpoints written under the older names still load."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from dynlab.config import BackboneConfig
from dynlab.data.base import DataInfo
from dynlab.techniques.fbnetv2.config import FBNetV2Config
from dynlab.techniques.fbnetv2.module import FBNetV2Module
from dynlab.validation import ConfigError, build_run, validate_config

from .conftest import technique_config

SPOS = ["technique=spos", "backbone=cifar_spos_supernet_tiny", "dataset=digits"]
FBNET = [
    "technique=fbnetv2",
    "backbone=cifar_fbnetv2_supernet_tiny",
    "dataset=digits",
    "technique.warmup_epochs=1",
]
GENES = [0, 1, 2, 3, 0]


def fbnet_choices(compose_cfg) -> dict[str, Any]:
    """A legal architecture of the tiny FBNetV2 space: its supernet's argmax at initialisation."""
    _, module = build_run(compose_cfg(FBNET))
    return module._supernet.choices()


def hydra_dict(value: Any) -> str:
    """`value` in Hydra's override grammar."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_dict(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(hydra_dict(v) for v in value) + "]"
    return json.dumps(value)


@pytest.mark.parametrize(
    ("old", "new"), [("arch", "architecture"), ("arch_file", "architecture_file")]
)
def test_the_older_spos_names_still_load_with_a_one_line_note(
    compose_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture, old: str, new: str
) -> None:
    value = GENES
    if (
        old == "arch_file"
    ):  # a search result as earlier versions wrote it: `genes`, no `architecture`
        value = tmp_path / "search_result.json"
        value.write_text(json.dumps({"genes": GENES, "arch": GENES, "mmacs": 0.5}))
    cfg = compose_cfg([*SPOS, f"technique.{old}={hydra_dict(value) if old == 'arch' else value}"])
    with caplog.at_level(logging.WARNING, logger="dynlab.validation"):
        validate_config(cfg)
    notes = [r.getMessage() for r in caplog.records]
    assert notes == [
        f"technique.{old} is deprecated: it still works, as technique.{new}; write that instead"
    ]
    _, module = build_run(cfg)
    assert module.given and module.architecture == tuple(GENES)
    assert [p.name for p in module.phases("train")] == ["retrain"]
    state = module.technique_state()
    assert state["architecture"] == GENES and state["standalone"] and "arch" not in state


def test_the_spos_imagenet_preset_takes_the_older_name(compose_cfg) -> None:
    official = [2, 1, 0, 1, 2, 0, 2, 0, 2, 0, 2, 3, 0, 0, 0, 0, 3, 2, 3, 3]
    cfg = compose_cfg(["+experiment=spos/imagenet", f"technique.arch={hydra_dict(official)}"])
    validate_config(cfg)
    config = OmegaConf.to_object(cfg.technique)
    assert config.architecture == official and config.arch is None


def test_fbnetv2s_older_name_loads_as_the_architecture(compose_cfg) -> None:
    choices = fbnet_choices(compose_cfg)
    config = technique_config(FBNetV2Config, choices=choices, warmup_epochs=1)
    assert config.architecture == choices and config.choices is None
    backbone = BackboneConfig(name="cifar_fbnetv2_supernet_tiny")
    module = FBNetV2Module(config, backbone, DataInfo("digits", 10, (3, 32, 32)))
    assert module.given and module.architecture == choices
    _, same = build_run(compose_cfg([*FBNET, f"technique.architecture={hydra_dict(choices)}"]))
    assert same.architecture == choices
    assert set(same.technique_state()) == {"space", "architecture", "standalone", "history"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([*SPOS, f"technique.arch={GENES}", f"technique.architecture={GENES}"], "older name"),
        ([*SPOS, f"technique.architecture={GENES}", "technique.architecture_file=x"], "not both"),
        ([*SPOS, "technique.architecture=[0,1]"], "spos technique.architecture: expected 5"),
        ([*FBNET, "technique.architecture=[0,1]"], "fbnetv2 technique.architecture: \\[0, 1\\]"),
        ([*FBNET, "technique.architecture_file=nowhere.json"], "architecture_file=nowhere.json"),
    ],
)
def test_a_wrong_architecture_is_refused_in_one_line(
    compose_cfg, overrides: list[str], message: str
) -> None:
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError, match=message) as refused:
        validate_config(cfg)
        build_run(cfg)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("technique", ["spos", "fbnetv2"])
def test_a_checkpoint_state_under_the_older_key_loads_and_another_space_is_refused(
    compose_cfg, technique: str
) -> None:
    overrides = SPOS if technique == "spos" else FBNET
    _, searched = build_run(compose_cfg(overrides))
    architecture = GENES if technique == "spos" else fbnet_choices(compose_cfg)
    state = {**searched.technique_state(), "standalone": False}
    del state["architecture"]
    state[searched.old_state_key] = architecture
    _, module = build_run(compose_cfg(overrides))
    module.load_technique_state(state)
    expected = tuple(GENES) if technique == "spos" else architecture
    assert module.architecture == expected and not module.given
    other = {**state, "space": {**state["space"], "num_classes": 3}}
    with pytest.raises(ValueError, match=r"another search space \(num_classes: 3 there, 10 here\)"):
        module.load_technique_state(other)
