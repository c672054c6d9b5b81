"""Anytime/budgeted callbacks on a tiny Lightning setup, a static one-exit model, W&B logging."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dynlab.evaluation.anytime import anytime_records
from dynlab.evaluation.budgeted import budgeted_curve
from dynlab.evaluation.callbacks import AnytimeEvaluation, BudgetedEvaluation, TechniqueFigures
from dynlab.evaluation.outcomes import load_outcomes
from dynlab.evaluation.outputs import collect_exit_probs
from dynlab.evaluation.plots import plot_overlay
from dynlab.logging import log_records
from dynlab.protocol import DynamicNet, StaticExits
from dynlab.results import json_safe

INPUT_SIZE = (3, 4, 4)


class CountingDataset(Dataset):
    """A random classification set counting how many items were read (to spot repeated passes)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = TensorDataset(
            torch.randn(n, *INPUT_SIZE, generator=g), torch.randint(0, 3, (n,), generator=g)
        )
        self.reads = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        self.reads += 1
        return self.data[i]


class TinyData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.info = SimpleNamespace(input_size=INPUT_SIZE)
        self.splits = {
            "train": CountingDataset(32, 0),
            "val": CountingDataset(20, 1),
            "test": CountingDataset(24, 2),
        }

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=8, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=8)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=8)


class TwoExitNet(DynamicNet):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head1 = nn.Linear(48, 16), nn.Linear(16, 3)
        self.body, self.head2 = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        h = torch.relu(self.stem(x.flatten(1)))
        return [self.head1(h), self.head2(torch.relu(self.body(h)))]

    def exit_macs(self, input_size: tuple[int, int, int]) -> list[float]:
        return [48.0 * 16 + 16 * 3, 48.0 * 16 + 16 * 3 + 16 * 16 + 16 * 3]


class TinyModule(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return sum(F.cross_entropy(logits, y) for logits in self.model.forward_exits(x))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.model.forward_exits(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(**kwargs) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    return pl.Trainer(
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_test_end_writes_results_plots_and_shares_each_pass(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data, module = TinyData(), TinyModule(TwoExitNet())
    callbacks = [
        AnytimeEvaluation(str(tmp_path)),
        BudgetedEvaluation(str(tmp_path)),
    ]
    run = trainer(max_epochs=2, callbacks=callbacks)
    run.fit(module, datamodule=data)
    assert not (tmp_path / "results.json").exists()  # nothing evaluated during fit
    run.test(module, datamodule=data, verbose=False)

    results = json.loads((tmp_path / "results.json").read_text())
    exit_macs = module.model.exit_macs(INPUT_SIZE)
    test = collect_exit_probs(module.model, data.test_dataloader())
    val = collect_exit_probs(module.model, data.val_dataloader())
    assert results["anytime"] == anytime_records(*test, exit_macs)
    assert [r["exit"] for r in results["anytime"]] == [1, 2]
    assert results["budgeted"]["exit_macs"] == exit_macs
    assert len(results["budgeted"]["curve"]) == 39
    assert results["budgeted"]["curve"] == json_safe(budgeted_curve(*val, *test, exit_macs))
    assert (tmp_path / "plots" / "anytime.png").stat().st_size > 0
    assert (tmp_path / "plots" / "budgeted.png").stat().st_size > 0
    outcomes = load_outcomes(tmp_path)  # per test image, beside results.json
    assert outcomes is not None and outcomes.exits is not None
    assert outcomes.predictions.shape == (2, 24) and outcomes.exits.shape == (39, 24)
    assert 100 * outcomes.budgeted_correct().mean(axis=1) == pytest.approx(
        [r["accuracy"] for r in results["budgeted"]["curve"]]
    )
    # The test loop's pass, then one pass per split at test end shared by both callbacks (one
    # deploy form for both), plus this test's reference pass.
    assert data.splits["test"].reads == 3 * 24
    assert data.splits["val"].reads == 2 * 20


def test_a_static_model_is_one_point_in_both(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = TinyData()
    module = TinyModule(StaticExits(nn.Sequential(nn.Flatten(), nn.Linear(48, 3))))
    anytime = AnytimeEvaluation(str(tmp_path)).evaluate(trainer(), module, data)
    curve = BudgetedEvaluation(str(tmp_path)).evaluate(trainer(), module, data)
    assert len(anytime) == 1 and len(curve) == 1
    assert anytime[0]["macs"] == curve[0]["avg_macs"] == 48 * 3
    assert anytime[0]["top1"] == curve[0]["accuracy"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["budgeted"]["exit_macs"] == [144.0]


class FakeRun:
    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log(self, data: dict) -> None:
        self.logged.append(data)


def test_records_go_to_wandb_loggers_only(tmp_path: Path) -> None:
    run = FakeRun()
    records = [{"q": 0.5, "avg_macs": 10.0, "accuracy": 50.0, "thresholds": [0.9, -1.0]}]
    log_records(
        [CSVLogger(tmp_path), WandbLogger(experiment=run)],
        "budgeted",
        records,
        "avg_macs",
        "accuracy",
        "t",
    )
    (logged,) = run.logged
    table = logged["budgeted/table"]
    assert table.columns == ["q", "avg_macs", "accuracy"]  # list fields stay out of the table
    assert table.data == [[0.5, 10.0, 50.0]]
    assert "budgeted/plot" in logged


def test_overlay_draws_curves_and_points_and_rejects_ambiguous_runs(tmp_path: Path) -> None:
    curve = [{"avg_macs": 1e8, "accuracy": 60.0}, {"avg_macs": 2e8, "accuracy": 70.0}]
    path = tmp_path / "overlay.png"
    plot_overlay(
        [{"label": "dynamic", "budgeted": curve}, {"label": "static", "point": (3e8, 72.0)}], path
    )
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="exactly one of"):
        plot_overlay([{"label": "both", "budgeted": curve, "point": (1.0, 2.0)}], path)


class _Drawing(TinyModule):
    """A module drawing one figure of its deploy form: the model it is handed must be that."""

    def evaluation_figures(self, model: nn.Module, datamodule) -> dict:
        from matplotlib.figure import Figure

        assert getattr(model, "deployed", False)
        x, _ = next(iter(datamodule.test_dataloader()))
        fig = Figure()
        fig.add_subplot().imshow(x[0, 0].numpy())
        return {"first_image": fig}


def test_technique_figures_are_written_and_logged_as_wandb_images(tmp_path: Path) -> None:
    run = FakeRun()
    module, data = _Drawing(TwoExitNet()), TinyData()
    figures = TechniqueFigures(str(tmp_path))
    tester = trainer(logger=WandbLogger(experiment=run), callbacks=[figures])
    tester.test(module, datamodule=data, verbose=False)
    assert (tmp_path / "plots/first_image.png").stat().st_size > 1000
    images = [d["figures/first_image"] for d in run.logged if "figures/first_image" in d]
    assert len(images) == 1 and type(images[0]).__name__ == "Image"
    # A module without figures draws nothing.
    assert TechniqueFigures(str(tmp_path)).evaluate(tester, TinyModule(TwoExitNet()), data) == []
