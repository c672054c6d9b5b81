"""User errors in one line, bugs with their traceback; divergence stops the run; quiet, non-blocking
logging; a model that cannot take the dataset's input size fails at validation."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from dynlab import logging as dlog
from dynlab.backbones import UnknownBackboneError
from dynlab.capabilities import Capability
from dynlab.data.base import DataRootError
from dynlab.divergence import DivergenceGuard
from dynlab.errors import CheckpointError, TrainingDiverged, UserError, reporting_user_errors
from dynlab.traits import TECHNIQUE_TRAITS
from dynlab.validation import (
    ConfigError,
    build_run,
    check_input_size,
    validate_config,
    validate_run,
)

from .conftest import TINY, run_cli


class _Tiny(pl.LightningModule):
    """A linear model whose loss turns NaN at `nan_at` (a global step), optimised either way."""

    def __init__(self, nan_at: int, manual: bool = False) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.nan_at = nan_at
        self.automatic_optimization = not manual
        self.current_phase = "warmup"

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        if self.global_step >= self.nan_at:
            loss = loss * float("nan")
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train/loss", loss)  # a manual technique returns nothing
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(16, 4))
        return torch.utils.data.DataLoader(data, batch_size=2)


def _fit(module: pl.LightningModule, tmp_path: Path) -> pl.Trainer:
    trainer = _trainer(tmp_path, DivergenceGuard())
    trainer.fit(module)
    return trainer


def _trainer(tmp_path: Path, guard: DivergenceGuard) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard],
        default_root_dir=tmp_path,
    )


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_nan_loss_stops_at_that_step_naming_phase_epoch_and_remedy(tmp_path, manual):
    module = _Tiny(nan_at=3, manual=manual)
    with pytest.raises(TrainingDiverged) as err:
        _fit(module, tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "phase 'warmup', epoch 0, step 4" in message and "nan" in message
    assert "technique.optim.lr" in message and "trainer.gradient_clip_val" in message
    assert isinstance(err.value, UserError)


class _EveryFourSteps(DivergenceGuard):
    """The guard as it runs on a GPU or under DDP: the flag is read back every 4 steps only."""

    def _due(self, trainer: pl.Trainer) -> bool:
        return trainer.global_step % 4 == 0


def test_a_late_check_still_names_the_first_non_finite_step(tmp_path):
    trainer = _trainer(tmp_path, _EveryFourSteps())
    with pytest.raises(TrainingDiverged, match="epoch 0, step 6: the loss is nan"):
        trainer.fit(_Tiny(nan_at=5))
    assert trainer.global_step == 8  # read at step 8, the first NaN was at step 6


def test_finite_loss_trains_through(tmp_path):
    assert _fit(_Tiny(nan_at=10**9), tmp_path).global_step == 8


def test_checkpoint_of_non_finite_weights_is_refused(tmp_path):
    module = _Tiny(nan_at=10**9)
    trainer = _fit(module, tmp_path)
    with torch.no_grad():
        module.layer.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="layer.weight"):
        trainer.save_checkpoint(tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()


def test_user_error_is_one_line_and_exit_2_while_bugs_keep_their_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info, reporting_user_errors("dynlab-x"):
        raise ConfigError("trainer.devices=2 needs a DDP strategy")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "dynlab-x: error: trainer.devices=2 needs a DDP strategy\n"
    with pytest.raises(RuntimeError, match="a bug"), reporting_user_errors("dynlab-x"):
        raise RuntimeError("a bug")


def test_data_backbone_and_config_errors_are_user_errors(compose_cfg, tmp_path):
    assert issubclass(DataRootError, UserError) and issubclass(UnknownBackboneError, UserError)
    with pytest.raises(ConfigError, match=r"technique: s2dnas search.threshold"):
        validate_config(compose_cfg([*TINY, "technique=s2dnas", "technique.search.threshold=2"]))


def test_technique_constructor_value_error_becomes_a_config_error(compose_cfg):
    cfg = compose_cfg([*TINY, "technique=s2dnas", "technique.split_points=[[7,2]]"])
    with pytest.raises(ConfigError, match="technique=s2dnas on backbone=cifar_resnet20: "):
        build_run(cfg)


@pytest.mark.parametrize("technique", ["baseline", "s2dnas"])
def test_model_that_cannot_take_the_input_size_fails_at_validation(compose_cfg, technique):
    """Before the technique analyses or wraps the backbone (S2DNAS traces it on build)."""
    vit = [*TINY, "backbone=timm", "backbone.name=vit_tiny_patch16_224"]
    with pytest.raises(ConfigError) as err:
        build_run(compose_cfg([*vit, f"technique={technique}"]))
    message = str(err.value)
    assert "backbone vit_tiny_patch16_224 cannot take synthetic's input size 3x32x32" in message
    assert "built for 3x224x224" in message and "+backbone.kwargs.img_size=32" in message
    assert "\n" not in message


def test_input_size_check_passes_what_the_model_can_take_and_keeps_the_rng(compose_cfg):
    vit = [*TINY, "backbone=timm", "backbone.name=vit_tiny_patch16_224"]
    cfg = compose_cfg([*vit, "+backbone.kwargs.img_size=32"])
    datamodule, module = build_run(cfg)
    assert module.forward_exits(torch.zeros(2, 3, 32, 32))[-1].shape == (2, 10)
    state = torch.get_rng_state()
    check_input_size(cfg, datamodule.info)
    assert torch.equal(torch.get_rng_state(), state)  # the run's weights do not depend on it


def test_apps_import_no_torch_before_the_config_is_checked():
    code = (
        "import sys, dynlab.apps.train, dynlab.apps.search, dynlab.apps.evaluate; "
        "print(sorted(m for m in ('torch', 'pytorch_lightning', 'timm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_config_error_from_the_cli_is_one_line_and_fast(tmp_path):
    start = time.perf_counter()
    proc = run_cli("train", [*TINY, "trainer.devices=2"], cwd=tmp_path, check=False)
    seconds = time.perf_counter() - start
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dynlab-train: error: trainer.devices=2 on CPU needs a DDP strategy: use trainer=ddp_cpu "
        "(or trainer.strategy=ddp)"
    ]
    assert seconds < 10, seconds  # torch is never imported (about 1 s on an idle machine)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_probe_answers_within_its_timeout():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert dlog.server_reachable(f"http://127.0.0.1:{server.getsockname()[1]}", 2.0)
    start = time.perf_counter()
    assert not dlog.server_reachable(f"http://127.0.0.1:{_closed_port()}", 2.0)
    assert time.perf_counter() - start < 3


@pytest.mark.slow
def test_diverged_run_exits_with_one_line_and_status_failed(tmp_path):
    args = [*TINY, "trainer.max_epochs=2", "technique.optim.lr=1e8", "hydra.run.dir=run"]
    proc = run_cli("train", args, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("dynlab-train: error: training diverged in phase 'train', epoch ")
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert results["status"] == "failed" and "TrainingDiverged" in results["error"]
    for path in (tmp_path / "run/checkpoints").rglob("*.ckpt"):
        weights = torch.load(path, weights_only=False)["state_dict"].values()
        assert all(bool(torch.isfinite(w).all()) for w in weights if w.is_floating_point()), path


@pytest.mark.slow
def test_online_wandb_without_server_logs_offline_quietly(tmp_path):
    """WANDB_MODE=online with no reachable server: a warning, an offline run, no console noise."""
    env = {"WANDB_MODE": "online", "WANDB_BASE_URL": f"http://127.0.0.1:{_closed_port()}"}
    env["WANDB_SILENT"] = "false"
    start = time.perf_counter()
    run_cli("train", [*TINY, "logger=wandb", "hydra.run.dir=run"], cwd=tmp_path, env=env)
    assert time.perf_counter() - start < 240
    out = (tmp_path / "train.stdout").read_text() + (tmp_path / "train.stderr").read_text()
    warnings = [line for line in out.splitlines() if "W&B server" in line]
    assert len(warnings) == 1 and "wandb sync " in warnings[0], out[-3000:]
    assert list((tmp_path / "run/wandb").glob("offline-run-*"))
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert results["status"] == "completed" and math.isfinite(results["metrics"]["test/top1"])
    for noise in ("💡", "litmodels", "litlogger", "GPU available", "Run history", "Seed set"):
        assert noise not in out, noise
    assert "MACs to exit 1" in out  # the end summary with dynlab's own MACs


def test_phase_line_names_the_phase_its_length_and_a_resume(compose_cfg, capsys):
    from dynlab import checkpointing as ckpt
    from dynlab.techniques.base import Phase

    cfg = compose_cfg([*TINY, "trainer.max_epochs=3"])
    _, module = build_run(cfg)
    assert dlog.announce_phase(cfg, module, Phase("train")) == "[dynlab] phase train: 3 epochs"
    assert capsys.readouterr().out == "[dynlab] phase train: 3 epochs\n"
    last = ckpt.phase_dir(cfg.run_dir, "search") / ckpt.LAST
    last.parent.mkdir(parents=True)
    last.touch()
    line = dlog.announce_phase(cfg, module, Phase("search", kind="custom"))
    assert line == "[dynlab] phase search: custom phase, resuming from its last checkpoint"


# --- every user error in one line, exit status 2, found before torch loads ------------------------

SLURM_MULTIRUN = ["-m", *TINY, "hydra/launcher=slurm"]
CIFAR10 = ["dataset=cifar10", "technique=baseline", "backbone=cifar_resnet20", "logger=csv"]
# (app, arguments, environment, what the one line must say: the bad setting and what would work)
BAD_COMMANDS = {
    "negative_lr": (
        "train",
        [*TINY, "technique.optim.lr=-1"],
        {},
        ["technique.optim.lr=-1.0", ">= 0"],
    ),
    "nested_recipe_lr": (
        "train",
        [*TINY, "++technique.phases={train: {optimizers: {main: {lr: -2}}}}"],
        {},
        ["technique.phases.train.optimizers.main.lr=-2.0", ">= 0"],
    ),
    "nesterov_without_momentum": (
        "train",
        [*TINY, "technique.optim.momentum=0"],
        {},
        ["technique.optim.momentum=0", "momentum > 0", "nesterov=false"],
    ),
    "milestones_in_epochs": (
        "train",
        [*TINY, "technique.optim.milestones=[100,150]"],
        {},
        ["technique.optim.milestones=[100.0, 150.0]", "fractions", "not epochs"],
    ),
    "fashion_mnist_not_installed": (
        "train",
        ["technique=baseline", "dataset=fashion_mnist", "dataset.root=/nowhere/fashion-mnist"],
        {},
        ["/nowhere/fashion-mnist does not exist", "apt-get install dataset-fashion-mnist"],
    ),
    "train_subset_above_train_split": (
        "train",
        ["technique=baseline", "dataset=fashion_mnist", "dataset.train_subset=56000"],
        {},
        ["dataset.train_subset=56000", "at most the 55000 training samples"],
    ),
    "val_size_zero_for_a_search": (
        "train",
        [*TINY, "technique=s2dnas", "dataset.val_size=0"],
        {},
        ["dataset.val_size=0 holds nothing out", "s2dnas", "calibrates its exit thresholds"],
    ),
    "val_size_above_train_split": (
        "train",
        [*TINY, "dataset.val_size=1000"],
        {},
        ["dataset.val_size=1000", "smaller than the 96 training samples of synthetic"],
    ),
    "search_without_a_search": (
        "search",
        TINY,
        {},
        ["technique=baseline has no search schedule", "dynlab-train", "s2dnas"],
    ),
    "zero_epochs": (
        "train",
        [*TINY, "trainer.max_epochs=0"],
        {},
        ["trainer.max_epochs=0", "1 or more"],
    ),
    "phase_of_zero_epochs": (
        "train",
        [*TINY, "++technique.phases={train: {epochs: 0}}"],
        {},
        ["technique.phases.train.epochs=0", "1 epoch or more"],
    ),
    "no_train_batches": (
        "train",
        [*TINY, "trainer.limit_train_batches=0"],
        {},
        ["trainer.limit_train_batches=0", "a batch count >= 1"],
    ),
    "unknown_option": (
        "train",
        [*TINY, "backbone=cifar_resnt20"],
        {},
        ["backbone=cifar_resnt20: no such option", "did you mean backbone=cifar_resnet20?"],
    ),
    "unknown_preset": (
        "train",
        ["+experiment=spos/digitz"],
        {},
        ["experiment=spos/digitz: no such option", "did you mean experiment=spos/digits?"],
    ),
    "wrong_type": (
        "train",
        [*TINY, "trainer.max_epochs=abc"],
        {},
        ["trainer.max_epochs: Value 'abc'", "converted to Integer"],
    ),
    "misspelt_key": (
        "search",
        [*TINY, "trainer.max_epoch=3"],
        {},
        ["trainer.max_epoch: no such key", "did you mean trainer.max_epochs?"],
    ),
    "key_of_a_map_of_recipes": (
        "train",
        [*TINY, "technique.phases.train.trainer.precision=32-true"],
        {},
        ["technique.phases.train: no such key", "'++technique.phases={train: {...}}' adds it"],
    ),
    "key_of_free_form_kwargs": (
        "train",
        [*TINY, "backbone.kwargs.foo.bar=1"],
        {},
        ["backbone.kwargs.foo: no such key", "+backbone.kwargs.foo=... adds one"],
    ),
    "bad_override_syntax": (
        "evaluate",
        ["ckpt_path"],
        {},
        ["Error parsing override 'ckpt_path'", "missing EQUAL"],
    ),
    "unknown_phase": ("train", [*TINY, "phase=trian"], {}, ["phase=trian", "its phases: train"]),
    "sfr_without_sfr_layers": (
        "train",
        [*TINY, "technique=sfr"],
        {},
        ["technique=sfr needs", "LGC/SFR", "cifar_resnet20 is none", "cifar_condensenetv2_110"],
    ),
    "spos_without_a_supernet": (
        "search",
        [*TINY, "technique=spos"],
        {},
        ["technique=spos needs an SPOS one-shot supernet", "cifar_spos_supernet"],
    ),
}


def _machine_commands(
    tmp_path: Path,
) -> dict[str, tuple[str, list[str], dict[str, str], list[str]]]:
    """Bad commands about this machine's files and programs (paths under tmp_path)."""
    (tmp_path / "a_file").write_text("not a folder\n")
    nowhere = tmp_path / "nowhere"
    venv_only = {"PATH": str(Path(sys.executable).parent)}  # a machine without Slurm
    return {
        "data_root_is_a_file": (
            "train",
            [*CIFAR10, f"dataset.root={tmp_path / 'a_file'}"],
            {},
            ["a_file is a file, not a directory", "dataset.root=", "cifar-10-batches-py"],
        ),
        "missing_data_root": (
            "train",
            [*CIFAR10, f"dataset.root={nowhere}"],
            {},
            ["nowhere does not exist", "dataset.root=", "cifar-10-batches-py"],
        ),
        "train_missing_ckpt_path": (
            "train",
            [*TINY, f"ckpt_path={nowhere}.ckpt"],
            {},
            [f"ckpt_path={nowhere}.ckpt: no such checkpoint file"],
        ),
        "search_ckpt_path_a_directory": (
            "search",
            [*TINY, "technique=s2dnas", f"ckpt_path={tmp_path}"],
            {},
            [f"ckpt_path={tmp_path}: a directory, not a checkpoint file"],
        ),
        "evaluate_missing_ckpt_path": (
            "evaluate",
            [f"ckpt_path={nowhere}.ckpt"],
            {},
            [f"ckpt_path={nowhere}.ckpt: no such checkpoint file"],
        ),
        "evaluate_without_a_checkpoint_or_export": (
            "evaluate",
            [],
            {},
            ["give ckpt_path=<run>/checkpoints/<phase>/<file>.ckpt or export_dir=<dir>"],
        ),
        "evaluate_export_dir_not_an_export": (
            "evaluate",
            [f"export_dir={tmp_path}"],
            {},
            [f"{tmp_path}/manifest.json: no readable export manifest"],
        ),
        "export_missing_ckpt_path": (
            "export",
            [f"ckpt_path={nowhere}.ckpt"],
            {},
            [f"ckpt_path={nowhere}.ckpt: no such checkpoint file"],
        ),
        "slurm_multirun_without_sbatch": (
            "train",
            SLURM_MULTIRUN,
            venv_only,
            ["hydra/launcher=slurm: sbatch was not found", "slurm/local-cluster.sh start"],
        ),
        "slurm_run_without_sbatch": (
            "search",
            [*TINY, "technique=s2dnas", "hydra/launcher=slurm"],
            venv_only,
            ["hydra/launcher=slurm: sbatch was not found", "slurm/local-cluster.sh start"],
        ),
    }


def _bad_command(tmp_path: Path, name: str) -> tuple[str, list[str], dict[str, str], list[str]]:
    return BAD_COMMANDS.get(name) or _machine_commands(tmp_path)[name]


MACHINE_CASES = [
    "data_root_is_a_file",
    "missing_data_root",
    "train_missing_ckpt_path",
    "search_ckpt_path_a_directory",
    "evaluate_missing_ckpt_path",
    "evaluate_without_a_checkpoint_or_export",
    "evaluate_export_dir_not_an_export",
    "export_missing_ckpt_path",
    "slurm_multirun_without_sbatch",
    "slurm_run_without_sbatch",
]


@pytest.mark.parametrize("name", [*BAD_COMMANDS, *MACHINE_CASES])
def test_a_bad_command_is_one_line_with_exit_status_2(tmp_path, name):
    """As a user types it: `<app>: error: <the bad setting and what would work>`, nothing else."""
    app, args, env, says = _bad_command(tmp_path, name)
    proc = run_cli(app, args, cwd=tmp_path, check=False, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"dynlab-{app}: error: "), proc.stderr[-3000:]
    for part in says:
        assert part in lines[0], (part, lines[0])


# Runs each bad command's app in one process, then names the heavy modules that were imported.
LIGHT_PATH_SCRIPT = """
import importlib, json, os, sys
failed = []
for app, args, env in json.loads(sys.argv[1]):
    saved = dict(os.environ)
    os.environ.update(env)
    sys.argv = [f"dynlab-{app}", *args]
    try:
        importlib.import_module(f"dynlab.apps.{app}").main()
    except SystemExit as exit:
        failed += [] if exit.code == 2 else [args]
    os.environ.clear()
    os.environ.update(saved)
print(json.dumps([failed, [m for m in ("torch", "pytorch_lightning", "timm") if m in sys.modules]]))
"""


def test_bad_commands_are_found_before_torch_is_imported(tmp_path):
    """Every case above ends before torch, Lightning or timm loads (what makes it take ~1 s)."""
    commands = [_bad_command(tmp_path, name)[:3] for name in [*BAD_COMMANDS, *MACHINE_CASES]]
    env = {**os.environ, "DYNLAB_OUTPUTS": str(tmp_path / "out")}
    env.pop("HYDRA_FULL_ERROR", None)
    out = subprocess.run(
        [sys.executable, "-c", LIGHT_PATH_SCRIPT, json.dumps(commands)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    failed, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert failed == [] and heavy == [], (failed, heavy)


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs Slurm's client, sbatch")
def test_slurm_multirun_without_a_controller_ends_with_one_dynlab_line(tmp_path):
    """sbatch is there but no cluster answers: submitit echoes sbatch's own lines, then dynlab's
    one line says what to do (an empty SLURM_CONF: nothing can be submitted anywhere)."""
    (tmp_path / "slurm.conf").touch()
    env = {"SLURM_CONF": str(tmp_path / "slurm.conf")}
    proc = run_cli("train", SLURM_MULTIRUN, cwd=tmp_path, check=False, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dynlab-train: error: hydra/launcher=slurm: sbatch failed: sbatch")
    assert "slurm/local-cluster.sh start" in last


def test_hydra_full_error_still_shows_hydras_whole_text(tmp_path):
    proc = run_cli(
        "train", [*TINY, "backbone=nope"], cwd=tmp_path, check=False, env={"HYDRA_FULL_ERROR": "1"}
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert (
        "Available options in 'backbone'" in proc.stderr
        and "dynlab-train: error" not in proc.stderr
    )


def test_help_and_cfg_job_still_work(tmp_path):
    assert "dynlab-train: train a technique" in run_cli("train", ["--help"], cwd=tmp_path).stdout
    shown = run_cli("search", ["--cfg", "job", "trainer.max_epochs=2"], cwd=tmp_path).stdout
    assert "max_epochs: 2" in shown and "mode: search" in shown


def test_an_error_inside_the_job_keeps_hydras_report():
    """Only what fails before the job starts becomes one line: a job's own Hydra error (a bug,
    say) keeps its traceback and exit status 1."""
    from hydra.errors import ConfigCompositionException

    from dynlab.apps._hydra import _before_the_job_in_one_line

    def job(cfg: object) -> None:
        raise ConfigCompositionException("raised by the job")

    with pytest.raises(ConfigCompositionException, match="raised by the job"):
        _before_the_job_in_one_line("dynlab-x", job, lambda: job(None))

    def compose() -> None:
        raise ConfigCompositionException("Could not override 'x'.\nTo append use +x=1")

    with pytest.raises(SystemExit) as exit_info:
        _before_the_job_in_one_line("dynlab-x", job, compose)
    assert exit_info.value.code == 2


def test_slurm_launcher_without_sbatch_is_refused_at_validation(compose_cfg, monkeypatch):
    cfg = compose_cfg([*TINY, "hydra/launcher=slurm"])
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ConfigError, match="sbatch was not found.*slurm/local-cluster.sh start"):
        validate_run(cfg)
    validate_config(cfg)  # the config itself is fine: a preset validates on any machine


def test_a_missing_ckpt_path_is_ignored_once_the_run_finished_a_phase(compose_cfg, tmp_path):
    cfg = compose_cfg([*TINY, f"ckpt_path={tmp_path / 'gone.ckpt'}"])
    with pytest.raises(CheckpointError, match="gone.ckpt: no such checkpoint file"):
        validate_run(cfg)
    done = Path(cfg.run_dir) / "checkpoints" / "train" / "done"
    done.parent.mkdir(parents=True)
    done.touch()
    validate_run(cfg)  # a rerun resumes from its own phase and does not read ckpt_path


def test_val_size_of_a_dataset_known_once_loaded_is_refused_in_one_line():
    """ImageNet's size is its folders': `setup` refuses the held-out split as a config error."""
    from dynlab.data.synthetic import SyntheticDataModule

    datamodule = SyntheticDataModule(num_train=40, num_test=8, val_size=40, batch_size=8)
    with pytest.raises(ConfigError, match=r"dataset.val_size=40 must be smaller than the 40"):
        datamodule.setup()


def test_declared_train_split_sizes_are_the_datamodules():
    from dynlab.config import DigitsConfig
    from dynlab.data.digits import DigitsDataModule

    datamodule = DigitsDataModule(val_size=100)
    datamodule.setup()
    assert len(datamodule.splits.train) + len(datamodule.splits.val) == DigitsConfig.TRAIN_SIZE


@pytest.mark.parametrize("technique", sorted(t for t, v in TECHNIQUE_TRAITS.items() if v.needs))
def test_a_refused_pairing_names_exactly_the_backbones_declaring_what_the_technique_needs(
    compose_cfg, technique
):
    from dynlab.backbones import backbones_with

    needs = TECHNIQUE_TRAITS[technique].needs
    with pytest.raises(ConfigError) as err:
        validate_config(compose_cfg([*TINY, f"technique={technique}"]))
    message = str(err.value)
    assert f"technique={technique} needs {needs.value} as its backbone" in message
    named = message.rpartition("set backbone.name to ")[2].replace(" or ", ", ").split(", ")
    assert named == backbones_with(needs) and named


def test_the_declarations_read_from_source_are_those_the_registry_holds():
    """Validation reads the backbones' declarations from their source (no torch); importing the
    backbones registers the same ones."""
    from dynlab.backbones import backbone_capabilities, list_backbones
    from dynlab.capabilities import declared_backbones

    declared = declared_backbones()
    assert declared == {name: backbone_capabilities(name) for name in list_backbones()}
    assert {n for n, caps in declared.items() if Capability.sparse_layers in caps} >= {
        "cifar_condensenetv2_110",
        "sfr_shufflenetv2_x1_0",
    }


def test_a_backbone_a_user_declares_is_judged_before_building(compose_cfg, monkeypatch):
    """A model registered with `register_backbone` is judged on its declaration, like dynlab's:
    refused before building when it lacks what the technique needs, and named when it has it."""
    from dynlab.backbones import Capability, create_backbone, register_backbone, registry

    monkeypatch.setattr(registry, "_DECLARED", dict(registry._DECLARED))  # undone after the test

    @register_backbone(Capability.spos_supernet)
    def users_declared_spos_supernet(pretrained: bool = False, **kwargs):
        return create_backbone("cifar_spos_supernet_tiny", **kwargs)

    @register_backbone()
    def users_declared_plain_net(pretrained: bool = False, **kwargs):
        return create_backbone("cifar_resnet20", **kwargs)

    base = [*TINY, "technique=spos", "backbone=timm"]
    validate_config(compose_cfg([*base, "backbone.name=users_declared_spos_supernet"]))
    with pytest.raises(ConfigError, match="plain_net is none: .*users_declared_spos_supernet"):
        validate_config(compose_cfg([*base, "backbone.name=users_declared_plain_net"]))


def test_a_users_own_supernet_is_judged_on_the_built_model(compose_cfg):
    """The early pairing check knows dynlab's backbone options only: a supernet a user registers
    under a new name passes it and is accepted by the module; a user's plain net is refused there."""
    from timm.models import register_model

    from dynlab.backbones import create_backbone
    from dynlab.validation import build_run, validate_config

    @register_model
    def users_tiny_spos_supernet(pretrained: bool = False, **kwargs):
        return create_backbone("cifar_spos_supernet_tiny", **kwargs)

    @register_model
    def users_plain_net(pretrained: bool = False, **kwargs):
        return create_backbone("cifar_resnet20", **kwargs)

    base = [*TINY, "technique=spos", "backbone=timm"]
    cfg = compose_cfg([*base, "backbone.name=users_tiny_spos_supernet"])
    validate_config(cfg)
    build_run(cfg)
    cfg = compose_cfg([*base, "backbone.name=users_plain_net"])
    validate_config(cfg)
    with pytest.raises(ConfigError, match="technique=spos needs an SPOS one-shot supernet"):
        build_run(cfg)
