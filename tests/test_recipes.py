"""Phase recipes: optimisers, parameter groups, schedules, freezing, manual optimisation, trainer
overrides, EMA, all from config; and the optimisation code at known steps."""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
import sys
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from pytorch_lightning.strategies import DDPStrategy
from torch import Tensor, nn

from dynlab import checkpointing as ckpt
from dynlab.building import build_datamodule, build_module
from dynlab.config import (
    SCHEMAS,
    EMAConfig,
    OptimConfig,
    ParamGroupConfig,
    PhaseRecipe,
    StreamConfig,
)
from dynlab.data.synthetic import SyntheticDataModule
from dynlab.optim import build_optimizer, lr_lambda, parameter_groups
from dynlab.protocol import StaticExits
from dynlab.runner import build_trainer, run_job
from dynlab.techniques.base import DynlabModule, Phase, assign_parameters
from dynlab.techniques.baseline.config import BaselineConfig
from dynlab.validation import ConfigError, technique_schema, validate_config

from .conftest import TINY

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _cfg(**kw) -> OptimConfig:
    return OptimConfig(**kw)


# --- schedules ------------------------------------------------------------------------------
def test_warmup_then_cosine_at_known_steps():
    f = lr_lambda(_cfg(schedule="cosine", warmup_epochs=1), total_steps=110, steps_per_epoch=10)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)  # cosine starts after warm-up ...
    assert f(60) == pytest.approx(0.5)  # ... is at half its length halfway ...
    assert f(110) == pytest.approx(0.0, abs=1e-12)  # ... and ends at zero
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_per_epoch_cosine_as_gfnet_holds_each_epochs_start_value():
    # GFNet's utils.py: lr = 0.5 * base * (1 + cos(pi * epoch / epochs)) at each epoch's start.
    f = lr_lambda(_cfg(schedule="cosine", per_epoch=True), total_steps=40, steps_per_epoch=10)
    for epoch in range(4):
        expected = 0.5 * (1 + math.cos(math.pi * epoch / 4))
        assert [f(epoch * 10 + i) for i in (0, 5, 9)] == pytest.approx([expected] * 3)


def test_step_schedule_decays_at_milestones():
    f = lr_lambda(_cfg(schedule="step", milestones=[0.5, 0.75], gamma=0.1), 100, 10)
    assert [f(s) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_linear_decay_per_iteration_as_spos():
    f = lr_lambda(_cfg(schedule="linear"), total_steps=200, steps_per_epoch=10)
    assert [f(s) for s in (0, 50, 100, 200, 300)] == pytest.approx([1, 0.75, 0.5, 0, 0])


def test_constant_schedule_only_warms_up():
    f = lr_lambda(_cfg(schedule="constant", warmup_epochs=0.5), 100, 10)
    assert [f(s) for s in (0, 4, 5, 99)] == pytest.approx([0.2, 1.0, 1.0, 1.0])


# --- parameter groups and optimisers ---------------------------------------------------------
def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def _named(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    net(torch.zeros(1, 3, 5, 5))  # materialise the lazy layer
    return list(net.named_parameters())


def test_norm_and_bias_get_no_weight_decay_and_groups_their_own_lr():
    net = _net()
    named = _named(net)
    o = _cfg(lr=0.1, weight_decay=5e-4, groups=[ParamGroupConfig(pattern="3.*", lr=0.01)])
    groups = {
        (g["lr"], g["weight_decay"]): sorted(id(p) for p in g["params"])
        for g in parameter_groups(net, named, o)
    }
    ids = {n: id(p) for n, p in named}
    assert groups == {
        (0.1, 5e-4): [ids["0.weight"]],
        (0.1, 0.0): sorted([ids["0.bias"], ids["1.weight"], ids["1.bias"]]),
        (0.01, 5e-4): [ids["3.weight"]],
        (0.01, 0.0): [ids["3.bias"]],
    }
    opt = build_optimizer(net, named, o)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]
    assert sorted(g["lr"] for g in opt.param_groups) == [0.01, 0.01, 0.1, 0.1]


def test_group_weight_decay_and_first_match_wins():
    net = _net()
    named = _named(net)
    o = _cfg(
        name="adam",
        no_decay_norm_and_bias=False,
        groups=[
            ParamGroupConfig(pattern="3.weight", weight_decay=0.0),
            ParamGroupConfig(pattern="3.*", lr=1.0),
        ],
    )
    opt = build_optimizer(net, named, o)
    assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    params = dict(named)
    assert by_param[id(params["3.weight"])] == (0.1, 0.0)
    assert by_param[id(params["3.bias"])] == (1.0, 5e-4)
    assert by_param[id(params["0.weight"])] == (0.1, 5e-4)


def test_parameters_are_split_over_named_optimisers():
    named = _named(_net())
    configs = {"arch": _cfg(params=["3.*"]), "weights": _cfg()}
    assigned = assign_parameters(named, configs)
    assert [n for n, _ in assigned["arch"]] == ["3.weight", "3.bias"]
    assert [n for n, _ in assigned["weights"]] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    with pytest.raises(ValueError, match="at most one"):
        assign_parameters(named, {"a": _cfg(), "b": _cfg()})
    with pytest.raises(ValueError, match="no parameters"):
        build_optimizer(nn.Linear(2, 2), [], _cfg(params=["nothing.*"]))


# --- recipes from config, end to end ----------------------------------------------------------
def test_recipe_freezes_parameters_and_sets_epochs_from_config(compose_cfg):
    cfg = compose_cfg(
        [
            *TINY,
            "trainer.max_epochs=3",
            "trainer.limit_train_batches=2",
            "++technique.phases={train: {epochs: 1, freeze: [model.net.head.fc.*],"
            " optimizers: {main: {lr: 0.05, schedule: constant}}}}",
        ]
    )
    pl.seed_everything(cfg.seed)  # as run_job does: the same initial weights
    module = build_module(cfg, build_datamodule(cfg))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    run_job(cfg)
    final = torch.load(
        ckpt.phase_dir(cfg.run_dir, "train") / ckpt.FINAL, map_location="cpu", weights_only=False
    )
    assert final["epoch"] == 1 and final["global_step"] == 2  # the recipe's 1 epoch, not 3
    assert final["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.05)
    state = final["state_dict"]
    fc = [n for n in before if n.startswith("model.net.head.fc.")]
    assert fc and all(torch.equal(state[n], before[n]) for n in fc)
    assert not torch.equal(state["model.net.stem.0.weight"], before["model.net.stem.0.weight"])


def test_a_whole_split_phase_trains_on_val_too_and_validates_on_nothing(compose_cfg, tmp_path):
    # 96 synthetic images, 32 held out, batch 32: 2 steps an epoch, 3 on the whole split.
    steps = {}
    for split in ("held_out", "whole"):
        recipe = f"++technique.phases={{train: {{train_split: {split}}}}}"
        cfg = compose_cfg([*TINY, recipe], run_dir=tmp_path / split)
        run_job(cfg)
        final = torch.load(
            ckpt.phase_dir(cfg.run_dir, "train") / ckpt.FINAL,
            map_location="cpu",
            weights_only=False,
        )
        steps[split] = final["global_step"]
        module = build_module(cfg, build_datamodule(cfg))
        module.start_phase(Phase("train"))
        trainer = build_trainer(cfg, Phase("train"), False, [], module)
        assert (trainer.limit_val_batches == 0) == (split == "whole")
    assert steps == {"held_out": 2, "whole": 3}


def test_val_size_zero_refuses_a_technique_that_needs_the_held_out_split(compose_cfg):
    s2dnas = [o.replace("technique=baseline", "technique=s2dnas") for o in TINY]
    cfg = compose_cfg([*s2dnas, "dataset.val_size=0"])
    with pytest.raises(ConfigError, match="val_size=0 holds nothing out, but s2dnas needs"):
        validate_config(cfg)
    cfg = compose_cfg([*s2dnas, "dataset.val_size=0", "evaluation.budgeted=false"])
    validate_config(cfg)  # nothing calibrated on val then


def test_recipe_pattern_and_ddp_options_reach_the_trainer(compose_cfg):
    s2dnas = [o.replace("technique=baseline", "technique=s2dnas") for o in TINY]
    cfg = compose_cfg(
        [
            *s2dnas,
            "trainer=ddp_cpu",
            "++technique.phases={retrain_*: {ddp: {find_unused_parameters: true},"
            " trainer: {gradient_clip_val: 2.0}}}",
        ]
    )
    datamodule = SyntheticDataModule(num_train=64, num_test=16, val_size=16, batch_size=16)
    module = build_module(cfg, datamodule)
    trainer = build_trainer(cfg, Phase("retrain_2"), False, [], module)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._ddp_kwargs == {"find_unused_parameters": True}
    assert trainer.gradient_clip_val == 2.0
    plain = build_trainer(cfg, Phase("train"), False, [], module)
    assert plain.gradient_clip_val is None
    assert not plain.strategy._ddp_kwargs.get("find_unused_parameters", False)


# --- manual optimisation, resumed exactly -----------------------------------------------------
class TwoOptimisers(DynlabModule):
    """Alternates two optimisers over body and head, as FBNetV2's weights and architecture."""

    def __init__(self) -> None:
        super().__init__(BaselineConfig())  # the optimisers are the recipe's
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.model = StaticExits(
            nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10))
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.manual_step("body" if batch_idx % 2 == 0 else "head", loss)
        self.log("train/loss", loss)


RECIPE = PhaseRecipe(
    epochs=2,
    optimizers={
        "head": OptimConfig(name="adam", lr=1e-2, params=["model.net.3.*"], schedule="step"),
        "body": OptimConfig(lr=0.05, warmup_epochs=0.5),
    },
    trainer={"gradient_clip_val": 0.5},
)


class StopAfterFirstEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True


def _fit(compose_cfg, run_dir: Path, module: DynlabModule, callbacks: list[pl.Callback]):
    """Fit `module` (its recipe for phase "train") on small synthetic data, resuming from the
    run dir's last checkpoint when there is one."""
    cfg = compose_cfg([*TINY], run_dir=run_dir)
    data = SyntheticDataModule(
        num_train=96, num_test=16, val_size=16, batch_size=16, image_size=8, seed=0
    )
    phase = Phase("train")
    module.start_phase(phase)
    trainer = build_trainer(cfg, phase, False, callbacks, module)
    resume = ckpt.resume_path(run_dir, "train")
    trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=False)
    return module


def _straight_and_resumed(compose_cfg, tmp_path: Path, make: Callable[[], DynlabModule]):
    """The same 2-epoch phase run straight, and stopped after epoch 1 then resumed."""
    straight = _fit(compose_cfg, tmp_path / "straight", make(), [])
    _fit(compose_cfg, tmp_path / "stopped", make(), [StopAfterFirstEpoch()])
    resumed = _fit(compose_cfg, tmp_path / "stopped", make(), [])
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    return straight


def _two_optimisers() -> TwoOptimisers:
    module = TwoOptimisers()
    module.set_recipes({"train": RECIPE})
    return module


def test_manual_optimisation_with_two_optimisers_resumes_exactly(compose_cfg, tmp_path):
    straight = _straight_and_resumed(compose_cfg, tmp_path, _two_optimisers)
    assert straight.manual_clip_val == 0.5
    opts = straight.optimizers()
    assert [type(o.optimizer).__name__ for o in opts] == ["Adam", "SGD"]
    assert [sum(len(g["params"]) for g in o.param_groups) for o in opts] == [2, 2]


# --- EMA ---------------------------------------------------------------------------------------
class RecordWeights(pl.Callback):
    """The live weights after every optimiser step, and a binary mask that flips each step."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.model.mask.fill_(float(batch_idx % 2))
        self.seen.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def test_ema_averages_weights_and_copies_masks(compose_cfg, tmp_path):
    cfg = compose_cfg([*TINY, "trainer.limit_val_batches=0"], run_dir=tmp_path)
    data = SyntheticDataModule(
        num_train=80, num_test=16, val_size=16, batch_size=16, image_size=8, seed=0
    )
    module = DynlabModule(BaselineConfig(optim=OptimConfig(lr=0.05, schedule="constant")))
    torch.manual_seed(0)
    module.model = StaticExits(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)))
    module.model.register_buffer("mask", torch.zeros(()))
    decay = 0.6
    module.set_recipes({"train": PhaseRecipe(epochs=1, ema=EMAConfig(decay=decay))})
    record = RecordWeights()
    phase = Phase("train")
    module.start_phase(phase)
    # The recorder runs before the EMA callback, which build_trainer appends last.
    build_trainer(cfg, phase, False, [record], module).fit(module, datamodule=data)
    expected = dict(record.seen[0])
    for weights in record.seen[1:]:
        expected = {n: decay * expected[n] + (1 - decay) * w for n, w in weights.items()}
    for name, p in module.named_parameters():
        assert torch.allclose(p, expected[name], atol=1e-6), name
        assert not torch.allclose(p, record.seen[-1][name])
    assert module.model.mask.item() == 1.0  # the last step's mask (batch 3 of 4), not a blend


def _with_ema() -> DynlabModule:
    module = DynlabModule(BaselineConfig(optim=OptimConfig(lr=0.05)))
    torch.manual_seed(0)
    module.model = StaticExits(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)))
    module.set_recipes({"train": PhaseRecipe(epochs=2, ema=EMAConfig(decay=0.7))})
    return module


def test_ema_resumes_exactly(compose_cfg, tmp_path):
    _straight_and_resumed(compose_cfg, tmp_path, _with_ema)


# --- one source of defaults ---------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEMAS["dataset"]))
def test_dataset_schema_defaults_match_the_datamodule(name):
    schema = SCHEMAS["dataset"][name]
    module_path, cls = schema._target_.rsplit(".", 1)
    datamodule = getattr(__import__(module_path, fromlist=[cls]), cls)
    defaults = {f: getattr(schema(), f, None) for f in schema.__dataclass_fields__}
    for param in inspect.signature(datamodule.__init__).parameters.values():
        if param.default is not inspect.Parameter.empty and param.name in defaults:
            if isinstance(defaults[param.name], str) and "${" in defaults[param.name]:
                continue  # an interpolation (the data root from DYNLAB_DATA)
            assert defaults[param.name] == param.default, (name, param.name)


@pytest.mark.parametrize("name", sorted(SCHEMAS["technique"]))
def test_technique_modules_take_their_schema_object_without_defaults(name):
    """A technique's defaults are written once, in its schema: its module's constructor takes the
    schema's object, the backbone and the dataset's info, none of them with a default."""
    schema = SCHEMAS["technique"][name]
    init = get_class(schema._target_).__init__
    params = list(inspect.signature(init).parameters.values())[1:]
    assert [p.name for p in params] == ["config", "backbone", "data_info"]
    assert all(p.default is inspect.Parameter.empty for p in params)
    assert typing.get_type_hints(init)["config"] is schema


# --- extra train streams ------------------------------------------------------------------------
class TwoStreams(DynlabModule):
    """Trains on FBNetV2's split: weights on one stream, a second stream alongside."""

    def __init__(self) -> None:
        super().__init__(BaselineConfig(optim=OptimConfig(lr=0.05)))
        self.model = StaticExits(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)))
        self.seen: list[tuple[str, ...]] = []

    def training_step(self, batch: dict[str, tuple[Tensor, Tensor]], batch_idx: int) -> Tensor:
        self.seen.append(tuple(sorted(batch)))
        x, y = batch["weights"]
        return nn.functional.cross_entropy(self.model(x), y)


def test_recipe_streams_feed_the_phase_and_end_with_it(compose_cfg, tmp_path):
    from dynlab.runner import run_schedule

    cfg = compose_cfg([*TINY, "trainer.max_epochs=1"], run_dir=tmp_path)
    data = SyntheticDataModule(
        num_train=116, num_test=16, val_size=16, batch_size=10, image_size=8, seed=0
    )
    module = TwoStreams()
    arch = {"fraction": 0.2, "key": "arch"}
    module.set_recipes(
        {
            "train": PhaseRecipe(
                streams={
                    "weights": StreamConfig(**arch, complement=True),
                    "arch": StreamConfig(**arch),
                }
            )
        }
    )
    run_schedule(cfg, module, data, [])
    # 100 train samples: the weights stream holds 80 (8 batches), arch 20 (2 batches, cycled).
    assert module.seen == [("arch", "weights")] * 8
    final = torch.load(
        ckpt.phase_dir(tmp_path, "train") / ckpt.FINAL, map_location="cpu", weights_only=False
    )
    assert final["global_step"] == 8
    assert data.train_streams is None  # the next phase gets the plain loader again


def test_a_recipe_for_a_phase_the_technique_lacks_is_refused():
    module = TwoOptimisers()
    module.set_recipes({"train": RECIPE, "*": PhaseRecipe()})
    with pytest.raises(ValueError, match=r"technique.phases.trian: .* \(its phases: train\)"):
        module.set_recipes({"trian": RECIPE})


def test_a_misspelt_recipe_phase_fails_the_cheap_validation(compose_cfg):
    from dynlab.validation import ConfigError, validate_config

    cfg = compose_cfg([*TINY, "++technique.phases={trian: {epochs: 1}}"])
    with pytest.raises(ConfigError, match=r"technique.phases.trian: baseline has no such phase"):
        validate_config(cfg)
    s2dnas = [o.replace("technique=baseline", "technique=s2dnas") for o in TINY]
    validate_config(compose_cfg([*s2dnas, "++technique.phases={retrain_*: {epochs: 1}}"]))


# --- paper presets ----------------------------------------------------------------------------
# The presets on a paper's data (CIFAR, ImageNet), the comparison charts' among them.
PAPER_PRESETS = sorted(
    str(p.relative_to(EXPERIMENTS)).removesuffix(".yaml")
    for p in EXPERIMENTS.glob("*/*.yaml")
    if re.search(r"override /dataset: (cifar10|cifar100|imagenet)\b", p.read_text())
)


def test_acnet_preset_trains_biases_at_twice_the_lr_with_the_same_decay(compose_cfg):
    """ACNet's ndp_train.py: every parameter named *bias (BN shifts too) at 2x the lr."""
    cfg = compose_cfg(["+experiment=blocks/resnet56_cifar10", "+backbone.kwargs.conv=acnet"])
    optim = OmegaConf.to_object(cfg.technique).optim
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 3, 5, 5))
    groups = parameter_groups(net, list(net.named_parameters()), optim)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    for name, param in net.named_parameters():
        expected = 2 * optim.lr if name.endswith("bias") else optim.lr
        assert lr_of[id(param)] == (pytest.approx(expected), optim.weight_decay), name
    assert optim.lr == 0.2


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_presets_state_their_precision_and_retrain_on_the_whole_split(compose_cfg, preset):
    """A paper preset says in which precision it trains (the GPU trainer's bf16 default is not
    the official codes' fp32), and a final retrain uses the whole training split."""
    text = (EXPERIMENTS / f"{preset}.yaml").read_text()
    assert "\n  precision: " in text.split("\ntrainer:", 1)[-1], preset
    cfg = compose_cfg([f"+experiment={preset}"])
    assert cfg.trainer.precision in ("32-true", "bf16-mixed")
    phases = cfg.technique.get("phases") or {}
    if "retrain" in phases:
        assert phases.retrain.train_split == "whole", preset


def _preset_steps():
    """benchmarks/preset_steps.py as a module (the GPU check's table of presets)."""
    path = EXPERIMENTS.parent / "benchmarks" / "preset_steps.py"
    spec = importlib.util.spec_from_file_location("preset_steps", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("preset_steps", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_gpu_checks_preset_table_covers_every_paper_preset_and_its_phases(compose_cfg):
    """The GPU check steps through every paper preset, each under phases it has and overrides
    that validate, so it cannot drift from the presets while no GPU runs it."""
    steps = _preset_steps()
    assert {c.preset for c in steps.CHECKS} == {p for p in PAPER_PRESETS if "compare/" not in p}
    for check in steps.CHECKS:
        cfg = compose_cfg([f"+experiment={check.preset}", *check.overrides, f"mode={check.mode}"])
        validate_config(cfg)
        phases = technique_schema(cfg).PHASES
        assert all(name in phases for name in check.phases), (check.preset, check.phases)
