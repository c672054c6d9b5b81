"""Deploy forms: norms folded, exits and outputs as in the training form, used by evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

from dynlab.config import BackboneConfig
from dynlab.data.base import DataInfo
from dynlab.evaluation.budgeted import calibrate_thresholds, exit_distribution, exit_indices
from dynlab.evaluation.early_exit import early_exit_predict
from dynlab.nn.fuse import conv_bn_pairs, fold_batchnorm
from dynlab.protocol import DynamicNet, StaticExits
from dynlab.techniques.base import DynlabModule
from dynlab.techniques.baseline.config import BaselineConfig
from dynlab.techniques.baseline.module import BaselineModule
from dynlab.techniques.s2dnas.config import S2DNASConfig
from dynlab.techniques.s2dnas.module import S2DNASModule

from .conftest import TINY, run_cli, technique_config

INFO = DataInfo("synthetic", 10, (3, 32, 32))


def baseline(backbone: str = "cifar_resnet20") -> BaselineModule:
    """An untrained baseline module on `backbone`, with the schema's defaults."""
    return BaselineModule(BaselineConfig(), BackboneConfig(name=backbone), INFO)


def trained(module: DynlabModule, steps: int = 2) -> DynlabModule:
    """Random BN affine parameters, a few SGD steps, then running statistics taken from a batch
    (momentum 1), so that folding has non-trivial values to fold (fresh BNs are identity maps)."""
    generator = torch.Generator().manual_seed(0)
    batch_norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    with torch.no_grad():
        for norm in batch_norms:
            norm.weight.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
            norm.bias.copy_(torch.randn(norm.num_features, generator=generator) * 0.2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    module.train()
    for _ in range(steps):
        x = torch.randn(8, *INFO.input_size, generator=generator)
        y = torch.randint(0, INFO.num_classes, (8,), generator=generator)
        optimizer.zero_grad()
        module.exit_losses(module.model.forward_exits(x), y).backward()
        optimizer.step()
    for norm in batch_norms:
        norm.momentum = 1.0
    with torch.no_grad():
        module.model.forward_exits(torch.randn(16, *INFO.input_size, generator=generator))
    return module.eval()


def inputs(n: int, seed: int) -> Tensor:
    return torch.randn(n, *INFO.input_size, generator=torch.Generator().manual_seed(seed))


def norms(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def assert_deploy_form(module: DynlabModule) -> nn.Module:
    """The deploy form computes every exit as the training form in eval mode (to 1e-5), has no
    BatchNorm left (each one followed a conv), the same exit MACs, and early-exits by the rule."""
    training = module.model
    deployed = module.deploy()
    assert deployed.deployed and not training.deployed and not deployed.training
    assert len(conv_bn_pairs(training, "forward_exits")) == norms(training) > 0
    assert norms(deployed) == 0 and norms(training) > 0  # the training form is left as it was
    x = inputs(8, seed=1)
    with torch.no_grad():
        expected, actual = training.forward_exits(x), deployed.forward_exits(x)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * float(e.abs().max().clamp(min=1)))
    assert deployed.exit_macs(INFO.input_size) == training.exit_macs(INFO.input_size)
    assert deployed.deploy() is deployed

    # Early exit on the deploy form gives the offline rule's exits and logits (thresholds set on
    # these very samples, so that about a third leaves at each exit whatever the random weights).
    with torch.no_grad():
        all_logits = torch.stack(deployed.forward_exits(x := inputs(30, seed=3)))
    probs = all_logits.softmax(-1)
    thresholds = calibrate_thresholds(probs, exit_distribution(1.0, len(probs)))
    logits, exits = early_exit_predict(deployed, x, thresholds)
    assert torch.equal(exits, exit_indices(probs, thresholds))
    torch.testing.assert_close(logits, all_logits[exits, torch.arange(len(x))])
    if len(probs) > 1:
        assert torch.bincount(exits).tolist() == [10] * len(probs)  # the batch really splits
    return deployed


@pytest.mark.parametrize(
    "backbone", ["cifar_resnet20", "cifar_vgg16_bn", "cifar_mobilenetv2", "resnet18"]
)
def test_baseline_deploy_form_folds_every_norm(backbone: str) -> None:
    torch.manual_seed(0)
    module = trained(baseline(backbone))
    deployed = assert_deploy_form(module)
    assert isinstance(deployed, StaticExits)


def test_sync_batchnorm_folds_like_batchnorm() -> None:
    """`trainer.sync_batchnorm=true` (Lightning converts every BatchNorm to SyncBatchNorm) must
    not leave norms in the deploy form."""
    torch.manual_seed(0)
    module = trained(baseline())
    module.model = nn.SyncBatchNorm.convert_sync_batchnorm(module.model).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in module.model.modules())
    assert_deploy_form(module)


@pytest.mark.parametrize("backbone", ["cifar_resnet20", "cifar_mobilenetv2"])
def test_s2dnas_deploy_form_folds_norms_into_each_stage_block(backbone: str) -> None:
    torch.manual_seed(0)
    config = technique_config(S2DNASConfig, split_points=[[2, 5]], concat=[[True], [False]])
    module = S2DNASModule(config, BackboneConfig(name=backbone), INFO)
    deployed = assert_deploy_form(trained(module))
    assert deployed.settings == module.model.settings and deployed.num_stages == 3
    assert deployed.programs is not None and module.model.programs is None  # flat stage programs
    blocks = [m for m in deployed.modules() if hasattr(m, "weights")]
    assert blocks and all(m.biases is not None for m in blocks)  # every block took a norm's shift


class ConvThenTwoReaders(nn.Module):
    """A conv whose output a norm and a skip both read, a norm after a linear layer, and one
    norm that normalises with batch statistics: none of these may be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.batch_stats = nn.BatchNorm2d(4, track_running_stats=False)
        self.fc, self.fc_norm = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        h = self.norm(h) + h
        h = self.batch_stats(self.conv2(h)).mean(dim=(2, 3))
        return self.fc_norm(self.fc(h))


def test_only_norms_reading_a_conv_alone_are_folded() -> None:
    net = ConvThenTwoReaders()
    assert conv_bn_pairs(net) == [("conv2", "batch_stats")]
    assert fold_batchnorm(net) == []  # batch statistics even in eval mode: left as it is
    assert norms(net) == 3 and not net.training


def test_the_training_form_keeps_training_after_deploy() -> None:
    module = trained(baseline()).train()
    module.deploy()
    assert module.model.training and norms(module.model) == 21
    assert all(p.requires_grad for p in module.model.parameters())


class NormSpy(pl.Callback):
    """Records how many norms the model has while the test loop and the other callbacks run."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(norms(pl_module.model))

    def on_test_end(self, trainer, pl_module) -> None:
        self.seen.append(norms(pl_module.model))


def test_the_test_loop_runs_on_the_deploy_form_and_restores_the_training_form() -> None:
    module = trained(baseline())
    training_form = module.model
    x, y = inputs(16, seed=4), torch.randint(0, 10, (16,))
    spy = NormSpy()
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[spy],
    )
    (metrics,) = trainer.test(module, DataLoader(TensorDataset(x, y), batch_size=8), verbose=False)
    # Both test batches, and the end of the test where the evaluation callbacks run.
    assert spy.seen == [0, 0, 0]
    assert module.model is training_form and norms(module.model) == 21
    with torch.no_grad():
        expected = (training_form(x).argmax(1) == y).float().mean() * 100
    assert metrics["test/top1"] == pytest.approx(float(expected))


class TwoStages(DynamicNet):
    """A DynamicNet of a technique that adds nothing to `deploy`: the base class folds its norms."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
        self.heads = nn.ModuleList(nn.Linear(4, 2) for _ in range(2))

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        h = self.a(x)
        g = self.b(h)
        return [self.heads[0](h.mean(dim=(2, 3))), self.heads[1](g.mean(dim=(2, 3)))]


def test_norms_on_any_exit_path_are_folded() -> None:
    net = TwoStages()
    trained_norms = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    for i, norm in enumerate(trained_norms):
        norm.running_mean.fill_(0.3 * i)
        norm.running_var.fill_(2.0 + i)
    deployed = net.deploy()
    assert norms(deployed) == 0
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for a, e in zip(deployed.forward_exits(x), net.eval().forward_exits(x), strict=True):
            torch.testing.assert_close(a, e)


@pytest.mark.slow
def test_evaluate_app_reproduces_an_s2dnas_runs_curves(tmp_path: Path) -> None:
    """dynlab-evaluate on an S2DNAS checkpoint gives the training run's anytime and budgeted
    curves (both on the deploy form) and its test metrics."""
    tiny_s2dnas = [*(a for a in TINY if a != "technique=baseline"), "technique=s2dnas"]
    run_cli("train", [*tiny_s2dnas, "hydra.run.dir=train_run"], cwd=tmp_path)
    trained_run = json.loads((tmp_path / "train_run/results.json").read_text())
    assert trained_run["status"] == "completed", trained_run.get("error")
    assert len(trained_run["anytime"]) == 3  # one exit per stage
    ckpt = tmp_path / "train_run/checkpoints/train/final.ckpt"
    run_cli("evaluate", [f"ckpt_path={ckpt}", "hydra.run.dir=eval_run"], cwd=tmp_path)
    evaluated = json.loads((tmp_path / "eval_run/results.json").read_text())
    assert evaluated["anytime"] == trained_run["anytime"]
    assert evaluated["budgeted"] == trained_run["budgeted"]
    assert evaluated["exit_macs"] == trained_run["exit_macs"]
    for key in ("test/top1", "test/top1_exit1", "test/top1_exit2"):
        assert evaluated["metrics"][key] == pytest.approx(trained_run["metrics"][key])
