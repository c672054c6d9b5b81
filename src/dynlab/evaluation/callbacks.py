"""Lightning callbacks running the anytime, budgeted-batch and latency evaluations for any technique.

Both run at the end of fit and of test, and `evaluate(trainer, pl_module)` runs them directly (the
evaluate app calls it after loading a checkpoint). They evaluate the model's deploy form (see
dynlab.protocol): outputs and exit MACs of the inference network. Each split's softmax outputs
are computed once per model and global step and shared by the two callbacks. Every rank takes
part in the passes: the datamodule's val/test loaders must give each rank a contiguous shard
(dynlab.data's EvalSampler does), which are all-gathered in rank order; rank zero then writes
results.json, the per-test-image outcomes (dynlab.evaluation.outcomes), plots/*.png, the W&B
tables and the console tables (`publish_anytime`, `publish_budgeted`: also what
dynlab-evaluate writes for an ONNX export).
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from dynlab.evaluation import latency
from dynlab.evaluation.anytime import anytime_records
from dynlab.evaluation.budgeted import DEFAULT_QS, budgeted_curve_and_exits
from dynlab.evaluation.outcomes import make_outcomes, update_outcomes
from dynlab.evaluation.outputs import collect_exit_probs
from dynlab.evaluation.plots import format_macs, plot_anytime, plot_budgeted
from dynlab.logging import log_images, log_records
from dynlab.results import read_results, update_results

if TYPE_CHECKING:
    from dynlab.config import LatencyConfig

# model -> (global_step, datamodule, {split: (probs [K,N,C], targets [N])}); only the latest kept.
_OUTPUTS: weakref.WeakKeyDictionary[nn.Module, tuple[int, Any, dict[str, tuple[Tensor, Tensor]]]]
_OUTPUTS = weakref.WeakKeyDictionary()
# training-form model -> (global_step, its deploy form); only the latest kept.
_DEPLOYED: weakref.WeakKeyDictionary[nn.Module, tuple[int, nn.Module]] = weakref.WeakKeyDictionary()


class _EndOfRunEvaluation(pl.Callback, ABC):
    """Runs `evaluate` at the end of test (the runner's and dynlab-evaluate's `trainer.test`),
    writing under `output_dir`. Never during fit: the test split never steers training."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    @abstractmethod
    def evaluate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
    ) -> list[dict[str, Any]]:
        """Run the evaluation on every rank and publish it from rank zero; returns the records."""


class AnytimeEvaluation(_EndOfRunEvaluation):
    """Top-1/top-5 of every exit on the test split against the MACs to reach it (anytime).

    Only at the end of a run: the test split never steers training or model selection.
    """

    def evaluate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
    ) -> list[dict[str, Any]]:
        """Anytime records of the model on the test split of `datamodule` (or the trainer's)."""
        datamodule = _datamodule(trainer, datamodule)
        model = dynamic_model(trainer, pl_module)
        test = exit_outputs(trainer, model, datamodule, "test")
        exit_macs = model.exit_macs(input_size(datamodule))
        if not trainer.is_global_zero:
            return anytime_records(*test, exit_macs)
        return publish_anytime(self.output_dir, test, exit_macs, trainer.loggers)


class BudgetedEvaluation(_EndOfRunEvaluation):
    """MSDNet's budgeted-batch curve: thresholds calibrated on the val split, reported on test."""

    def __init__(self, output_dir: str, qs: Sequence[float] | None = None) -> None:
        qs = DEFAULT_QS if qs is None else tuple(float(q) for q in qs)
        if not qs or min(qs) <= 0:
            raise ValueError(f"qs must be a non-empty list of budget levels > 0, got {qs}")
        super().__init__(output_dir)
        self.qs = qs

    def evaluate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
    ) -> list[dict[str, Any]]:
        """The budgeted curve of the model (val: the held-out calibration split, never test)."""
        datamodule = _datamodule(trainer, datamodule)
        model = dynamic_model(trainer, pl_module)
        test = exit_outputs(trainer, model, datamodule, "test")
        exit_macs = model.exit_macs(input_size(datamodule))
        val = (None, None)
        if needs_held_out(exit_macs, datamodule):
            val = exit_outputs(trainer, model, datamodule, "val")
        if not trainer.is_global_zero:
            return budgeted_curve_and_exits(
                *val, *test, exit_macs, budget_levels(self.qs, exit_macs)
            )[0]
        return publish_budgeted(self.output_dir, val, test, exit_macs, self.qs, trainer.loggers)


def publish_anytime(
    output_dir: Path,
    test: tuple[Tensor, Tensor],
    exit_macs: Sequence[float],
    loggers: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """Anytime records of test softmax outputs [K,N,C] and targets: into results.json, the
    per-image outcomes, plots/anytime.png, W&B and the console."""
    records = anytime_records(*test, exit_macs)
    update_results(output_dir, anytime=records)
    record_outcomes(output_dir, *test, exit_macs)
    plot_anytime(records, output_dir / "plots" / "anytime.png")
    log_records(loggers, "anytime", records, "macs", "top1", "anytime prediction")
    rows = [
        [str(r["exit"]), format_macs(r["macs"]), f"{r['top1']:.2f}", f"{r['top5']:.2f}"]
        for r in records
    ]
    _print_table("anytime prediction (test)", ["exit", "MACs", "top-1 %", "top-5 %"], rows)
    return records


def needs_held_out(exit_macs: Sequence[float], datamodule: Any) -> bool:
    """Whether the budgeted curve reads val: several exits to calibrate, or one exit and a val
    split to report on (dataset.val_size=0 holds nothing out)."""
    return len(exit_macs) > 1 or getattr(datamodule, "val_size", 1) > 0


def budget_levels(qs: Sequence[float], exit_macs: Sequence[float]) -> Sequence[float]:
    """The levels to report: one exit makes every level the same point."""
    return qs if len(exit_macs) > 1 else qs[:1]


def publish_budgeted(
    output_dir: Path,
    val: tuple[Tensor | None, Tensor | None],
    test: tuple[Tensor, Tensor],
    exit_macs: Sequence[float],
    qs: Sequence[float],
    loggers: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """The budgeted curve (thresholds calibrated on `val`, reported on `test`): into
    results.json, the per-image outcomes, plots/budgeted.png, W&B and the console."""
    qs = budget_levels(qs, exit_macs)
    curve, exits = budgeted_curve_and_exits(*val, *test, exit_macs, qs)
    update_results(output_dir, budgeted={"curve": curve, "exit_macs": exit_macs})
    record_outcomes(output_dir, *test, exit_macs, exits, qs)
    plot_budgeted(curve, output_dir / "plots" / "budgeted.png")
    log_records(loggers, "budgeted", curve, "avg_macs", "accuracy", "budgeted")
    shown = sorted({round(i * (len(curve) - 1) / 4) for i in range(5)})  # about 5 levels
    rows = [
        [f"{r['q']:.2f}", format_macs(r["avg_macs"]), f"{r['accuracy']:.2f}"]
        for r in (curve[i] for i in shown)
    ]
    _print_table("budgeted batch (test)", ["q", "avg MACs", "top-1 %"], rows)
    return curve


class TechniqueFigures(_EndOfRunEvaluation):
    """Pictures a technique draws of its deploy form at the end of a run (GFNet's patch sequences):
    `pl_module.evaluation_figures(model, datamodule)` gives {name: Figure}, written to
    plots/<name>.png and logged as W&B images. Rank zero only; a module without it draws nothing."""

    def evaluate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
    ) -> list[dict[str, Any]]:
        draw = getattr(pl_module, "evaluation_figures", None)
        if draw is None or not trainer.is_global_zero:
            return []
        figures = draw(dynamic_model(trainer, pl_module), _datamodule(trainer, datamodule))
        records = []
        for name, figure in figures.items():
            path = self.output_dir / "plots" / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(path)
            records.append({"figure": name, "path": str(path)})
        log_images(trainer.loggers, {f"figures/{r['figure']}": r["path"] for r in records})
        return records


class LatencyEvaluation(_EndOfRunEvaluation):
    """Measured milliseconds of the deploy form, after the anytime and budgeted evaluations (whose
    thresholds it times): its ONNX export into <run>/export (parity at every exit), then each
    exit's ms per image in PyTorch and ONNX Runtime, and the budgeted curve's ms axis, on the
    first test images (dynlab.evaluation.latency). Rank zero only; an export that fails is
    recorded in one line and PyTorch is still timed."""

    def __init__(self, output_dir: str, settings: LatencyConfig) -> None:
        super().__init__(output_dir)
        self.settings = settings

    def evaluate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
    ) -> list[dict[str, Any]]:
        if not trainer.is_global_zero:
            return []
        datamodule = _datamodule(trainer, datamodule)
        model = dynamic_model(trainer, pl_module)
        size = input_size(datamodule)
        record = measure_latency(
            model,
            size,
            first_test_images(datamodule, self.settings.images),
            read_results(self.output_dir).get("budgeted", {}).get("curve", []),
            self.settings,
            self.output_dir / "export",
        )
        update_results(self.output_dir, latency=record)
        rows = latency_rows(record, model.exit_macs(size))
        first_ms = next(c for c in rows[0] if c.startswith("ms_"))  # PyTorch, first batch size
        log_records(trainer.loggers, "latency", rows, "macs", first_ms, "latency per exit")
        columns = list(rows[0])
        _print_table(
            "measured latency per exit (ms per image)",
            columns,
            [[format_macs(v) if c == "macs" else f"{v:.4g}" for c, v in r.items()] for r in rows],
        )
        if "error" in record.get("export", {}):
            Console(stderr=True).print(f"ONNX export skipped: {record['export']['error']}")
        return rows


def measure_latency(
    model: nn.Module,
    size: tuple[int, int, int],
    images: Tensor,
    curve: Sequence[dict[str, Any]],
    settings: LatencyConfig,
    export_dir: Path,
) -> dict[str, Any]:
    """The latency record of results.json: machine, settings, export, per exit and per budget."""
    from dynlab.evaluation.export import ExportError, OnnxExits, export_onnx

    record: dict[str, Any] = {"machine": latency.machine(), "settings": asdict(settings)}
    runtimes: dict[str, nn.Module] = {"torch": model}
    with latency.torch_threads(settings.threads):
        record["machine"]["threads"] = torch.get_num_threads()
        if settings.onnx:
            thresholds = {str(r["q"]): r["thresholds"] for r in curve if "thresholds" in r}
            try:
                manifest = export_onnx(
                    model,
                    size,
                    export_dir,
                    images=images[:16],
                    tolerance=settings.parity_tolerance,
                    manifest={"thresholds": thresholds},
                )
                runtimes["onnxruntime"] = OnnxExits(export_dir, threads=settings.threads)
                record["export"] = {"dir": export_dir.name, "parity": manifest["parity"]}
            except ExportError as err:
                record["export"] = {"error": str(err)}
        record["exits"] = latency.measure_exits(
            runtimes, images, settings.batch_sizes, settings.warmup, settings.repeats
        )
        if settings.budget_batch and len(curve) > 1:
            record["budgeted"] = latency.measure_budgets(
                runtimes, images, curve, settings.budget_batch, 1, settings.budget_repeats
            )
    return record


def latency_rows(record: dict[str, Any], exit_macs: Sequence[float]) -> list[dict[str, Any]]:
    """One row per exit: its MACs and ms per image for each runtime and batch size."""
    rows = [{"exit": k + 1, "macs": float(m)} for k, m in enumerate(exit_macs)]
    for batch, entry in record["exits"].items():
        for name, per_exit in entry.items():
            if name == "noise_floor":
                continue
            for row, figure in zip(rows, per_exit, strict=True):
                row[f"ms_{name}_b{batch.removeprefix('batch_')}"] = figure["ms_per_image"]
    return rows


def first_test_images(datamodule: pl.LightningDataModule, count: int) -> Tensor:
    """The first `count` test images (all of them when the split is smaller)."""
    taken: list[Tensor] = []
    for x, _ in datamodule.test_dataloader():
        taken.append(x)
        if sum(len(t) for t in taken) >= count:
            break
    return torch.cat(taken)[:count]


def dynamic_model(trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
    """The deploy form of the model answering the dynamic-model protocol (`pl_module.model`, else
    `pl_module`): the model itself when it is one (a DynlabModule swaps it in for its test loop),
    else its `deploy()`, built once per model and global step and shared by the callbacks."""
    model = getattr(pl_module, "model", pl_module)
    missing = [m for m in ("forward_exits", "exit_macs", "deploy") if not hasattr(model, m)]
    if missing:
        raise TypeError(f"{type(model).__name__} lacks {missing} (see dynlab.protocol)")
    if getattr(model, "deployed", False):
        return model
    step, deployed = _DEPLOYED.get(model, (None, None))
    if step != trainer.global_step or deployed is None:
        deployed = model.deploy()
        _DEPLOYED[model] = (trainer.global_step, deployed)
    return deployed


def exit_outputs(
    trainer: pl.Trainer, model: nn.Module, datamodule: pl.LightningDataModule, split: str
) -> tuple[Tensor, Tensor]:
    """Softmax outputs [K,N,C] and targets [N] of the `split` loader, computed once per step."""
    step, source, cached = _OUTPUTS.get(model, (None, None, {}))
    if step != trainer.global_step or source is not datamodule:
        cached = {}
        _OUTPUTS[model] = (trainer.global_step, datamodule, cached)
    if split not in cached:
        loader = getattr(datamodule, f"{split}_dataloader")()
        cached[split] = collect_exit_probs(model, loader)
    return cached[split]


def record_outcomes(
    output_dir: Path,
    probs: Tensor,
    targets: Tensor,
    exit_macs: Sequence[float],
    exits: Tensor | None = None,
    qs: Sequence[float] | None = None,
) -> None:
    """Write the per-test-image outcomes (each exit's label, and the budgeted exits when given)
    beside results.json, so that a report can bootstrap over the test images."""
    predictions = probs.argmax(dim=2)
    update_outcomes(output_dir, make_outcomes(targets, predictions, exit_macs, exits, qs))


def input_size(datamodule: pl.LightningDataModule) -> tuple[int, int, int]:
    """(C, H, W) of one sample: `datamodule.info.input_size`, else the shape of one test batch."""
    size = getattr(getattr(datamodule, "info", None), "input_size", None)
    if size is None:
        x, _ = next(iter(datamodule.test_dataloader()))
        size = x.shape[1:]
    return tuple(int(d) for d in size)  # type: ignore[return-value]


def _datamodule(
    trainer: pl.Trainer, datamodule: pl.LightningDataModule | None
) -> pl.LightningDataModule:
    datamodule = datamodule or trainer.datamodule
    if datamodule is None:
        raise ValueError("no datamodule: pass one to evaluate() or attach one to the trainer")
    return datamodule


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
