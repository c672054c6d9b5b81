"""User errors in one line, bugs with their traceback; divergence stops the run; quiet, non-blocking
logging; a model that cannot take the dataset's input size fails at validation."""

from __future__ import annotations

import json
import math
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
from dynlab.data.base import DataRootError
from dynlab.divergence import DivergenceGuard
from dynlab.errors import TrainingDiverged, UserError, reporting_user_errors
from dynlab.validation import ConfigError, build_run, check_input_size, validate_config

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
