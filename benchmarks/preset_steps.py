"""A few training steps of every paper preset, on generated data of the preset's size: each
technique's real step on its real network, in the preset's precision and, where the preset keeps
bf16-mixed, again in fp32 from the same seed, with the two runs' losses compared step by step.

The checks run in order of value (the numerically delicate and the bf16 presets first) until the
time budget is spent; the rest are reported as skipped. One JSON object a line:
  python3 benchmarks/preset_steps.py --budget 420          # on a GPU (gpu_check.sh does)
  python3 benchmarks/preset_steps.py --device cpu --image-size 64 --batch-size 4 --steps 2 \
      --only spos/imagenet                                  # a CPU smoke run of the script
bf16 is judged against fp32 by the relative gap of the first step's loss (the same weights and
batch: rounding alone; `--first-tolerance`, 2 %: bf16 keeps 8 bits of mantissa, about 0.4 % a
rounding) and of each loss's mean over the steps run (the updates compound the rounding;
`--tolerance`, 5 %), and for GFNet's PPO by the mean probability ratio pi_new / pi_old, 1 in
exact arithmetic on its single update a batch (within `--ratio-tolerance` of 1). CPU autocast is
not evidence for a GPU's bf16; the CPU mode only checks that the script runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from dynlab.apps._hydra import CONFIG_DIR
from dynlab.data.fake import write_fake_cifar, write_fake_imagenet
from dynlab.runner import build_trainer, phase_data, schedule
from dynlab.validation import build_run

FP32 = "32-true"
# The losses a step logs (a fit phase's loss; FBNetV2's search steps, weights and architecture)
# and GFNet's PPO reward and ratio.
LOSSES = ("train/loss", "search/ce", "search/arch_loss")
RECORDED = (*LOSSES, "train/reward", "train/ppo_ratio")


@dataclass(frozen=True)
class Check:
    """One preset's phases to step through (`mode`: the app's, `overrides`: what else it needs)."""

    preset: str
    phases: tuple[str, ...]
    mode: str = "train"
    overrides: tuple[str, ...] = field(default_factory=tuple)


# Most valuable first: PPO and the Gumbel search (numerically delicate), then the presets that keep
# bf16, then the fp32 ones, then the CIFAR presets and the remaining variants of a checked network.
CHECKS = (
    Check("gfnet/resnet50_p96_imagenet", ("stage_1", "stage_2")),
    Check("fbnetv2/imagenet_f", ("search",), overrides=("technique.warmup_epochs=0",)),
    Check("spos/imagenet", ("supernet",)),
    Check("metapruning/imagenet_mobilenetv2", ("pruningnet",)),
    Check("anglenas/imagenet", ("shrink",)),
    Check("condensenetv2/imagenet_a", ("train",)),
    Check("gfnet/mobilenetv3_p96_imagenet", ("glance", "stage_1", "stage_2")),
    # S2DNAS's multi-stage network with its multi-exit loss (what its candidates and retrains run)
    Check("s2dnas/resnet56_cifar10", ("train",)),
    Check("blocks/resnet56_cifar10", ("train",), overrides=("+backbone.kwargs.conv=acnet",)),
    Check("blocks/resnet56_cifar10", ("train",), overrides=("+backbone.kwargs.conv=weightnet",)),
    Check("blocks/repvgg_cifar10", ("train",)),
    Check("condensenetv2/cifar_110_cifar10", ("train",)),
    Check("gfnet/resnet32_cifar10", ("stage_1", "stage_2")),
    Check("fbnetv2/cifar10", ("search",), overrides=("technique.warmup_epochs=0",)),
    Check("metapruning/imagenet_resnet50", ("pruningnet",)),
    Check("gfnet/resnet50_p128_imagenet", ("stage_1", "stage_2")),
    Check("condensenetv2/imagenet_b", ("train",)),
    Check("condensenetv2/imagenet_c", ("train",)),
    Check("condensenetv2/cifar_146_cifar100", ("train",)),
    Check("s2dnas/resnet56_cifar100", ("train",)),
    Check("condensenetv2/cifar_110_cifar100", ("train",)),
    Check("condensenetv2/cifar_146_cifar10", ("train",)),
)


class StepRecorder(pl.Callback):
    """Records the logged training values of every step and stops the fit after `steps`."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.rows: list[dict[str, float]] = []
        self.started, self.seconds = 0.0, math.nan  # timed from the second step's start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1:  # the first step (cudnn autotuning, lazy init) is not timed
            self._sync(pl_module)
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        self.rows.append({k: float(metrics[k]) for k in RECORDED if k in metrics})
        if len(self.rows) >= self.steps:
            self._sync(pl_module)
            trainer.should_stop = True
            self.seconds = time.perf_counter() - self.started

    @staticmethod
    def _sync(module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()


def generate_data(root: Path, args: argparse.Namespace) -> dict[str, str]:
    """Generated data in each dataset's layout, large enough for the presets' batches."""
    imagenet = root / "imagenet"
    per_class = max(1, math.ceil(args.images / args.classes))
    write_fake_imagenet(imagenet, args.classes, per_class, 1, size=args.generated_size)
    for classes in (10, 100):
        write_fake_cifar(root, num_classes=classes, num_train=args.images, num_test=100)
    return {"imagenet": str(imagenet), "cifar10": str(root), "cifar100": str(root)}


def compose_preset(
    check: Check, precision: str, data: dict[str, str], run_dir: Path, args
) -> DictConfig:
    """The preset composed for a short run on generated data in `precision`."""
    overrides = [
        f"+experiment={check.preset}",
        *check.overrides,
        f"mode={check.mode}",
        f"trainer.precision={precision}",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        f"dataset.val_size={min(50, args.images // 4)}",
        f"run_dir={run_dir}",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        probe = compose("config", overrides=overrides)
        dataset = probe.dataset.name
        overrides.append(f"dataset.root={data[dataset]}")
        if dataset == "imagenet":
            overrides.append(f"dataset.num_classes={args.classes}")
        # one device of the kind asked for (the CIFAR presets leave the trainer to the command)
        accelerator = "gpu" if args.device == "gpu" else "cpu"
        overrides += [
            f"trainer.accelerator={accelerator}",
            "trainer.strategy=auto",
            "trainer.devices=1",
        ]
        if args.image_size:
            overrides.append(f"dataset.image_size={args.image_size}")
        if args.batch_size:
            overrides.append(f"dataset.batch_size={args.batch_size}")
        overrides.append(f"dataset.num_workers={args.num_workers}")
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        for recipe in cfg.technique.get("phases", {}).values():
            if "trainer" in recipe and "precision" in recipe.trainer:
                recipe.trainer.precision = precision  # a phase's own precision follows too
    return cfg


def step_phase(cfg: DictConfig, name: str, steps: int) -> dict[str, Any]:
    """`steps` training steps of phase `name` from the seed; the logged values and the time."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module = build_run(cfg)
    phase = next(p for p in schedule(module, cfg) if p.name == name)
    module.start_phase(phase)
    recorder = StepRecorder(steps)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with phase_data(module, datamodule, phase):
        trainer = build_trainer(cfg, phase, False, [recorder], module)
        trainer.fit(module, datamodule=datamodule, weights_only=False)
    timed = max(len(recorder.rows) - 1, 1)
    return {
        "rows": recorder.rows,
        "ms_per_step": round(1000 * recorder.seconds / timed, 1),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
    }


def _gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-8)


def compare(low: list[dict[str, float]], full: list[dict[str, float]], args) -> dict[str, Any]:
    """How far the bf16 steps are from the fp32 ones: the first step's losses (the same weights
    and batch, so rounding alone; `--first-tolerance`) and each loss's mean over the steps (the
    updates compound the rounding; `--tolerance`), and for PPO the ratio's distance from 1."""
    keys = [k for k in LOSSES if low and full and k in low[0] and k in full[0]]
    first = [_gap(low[0][k], full[0][k]) for k in keys]
    means = [
        _gap(
            sum(r[k] for r in low if k in r) / len(low),
            sum(r[k] for r in full if k in r) / len(full),
        )
        for k in keys
    ]
    verdict: dict[str, Any] = {
        "first_step_gap": round(max(first), 4) if first else None,
        "mean_loss_gap": round(max(means), 4) if means else None,
    }
    within = bool(keys) and max(first) <= args.first_tolerance and max(means) <= args.tolerance
    ratios = [row["train/ppo_ratio"] for row in low if "train/ppo_ratio" in row]
    if ratios:
        verdict["max_ratio_gap"] = round(max(abs(r - 1) for r in ratios), 4)
        within = within and verdict["max_ratio_gap"] <= args.ratio_tolerance
    verdict["agree"] = within
    return verdict


def run_check(check: Check, data: dict[str, str], tmp: Path, args) -> dict[str, Any]:
    """Every phase of `check` in the preset's precision (and fp32 where that is bf16)."""
    out: dict[str, Any] = {"preset": check.preset, "overrides": list(check.overrides)}
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        preset = compose("config", overrides=[f"+experiment={check.preset}", *check.overrides])
    own = str(preset.trainer.precision)
    out["precision"] = own
    for name in check.phases:
        runs = {}
        for precision in dict.fromkeys([own, FP32]):
            run_dir = tmp / f"{check.preset.replace('/', '_')}_{name}_{precision}"
            cfg = compose_preset(check, precision, data, run_dir, args)
            runs[precision] = step_phase(cfg, name, args.steps)
        phase: dict[str, Any] = {}
        for precision, run in runs.items():
            series = {key: [row.get(key) for row in run["rows"]] for key in RECORDED}
            phase[precision] = {
                **{k: v for k, v in run.items() if k != "rows"},
                **{
                    key.removeprefix("train/"): v
                    for key, v in series.items()
                    if any(x is not None for x in v)
                },
            }
        if own != FP32:
            phase["bf16_vs_fp32"] = compare(runs[own]["rows"], runs[FP32]["rows"], args)
        out[name] = phase
    return out


def main() -> None:
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)  # the JSON lines are the output
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all checks")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", nargs="*", default=None, help="presets to check (default all)")
    parser.add_argument("--classes", type=int, default=100, help="generated ImageNet classes")
    parser.add_argument("--images", type=int, default=1600, help="generated training images")
    parser.add_argument("--generated-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=None, help="override the presets'")
    parser.add_argument("--batch-size", type=int, default=None, help="override the presets'")
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--first-tolerance", type=float, default=0.02)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--ratio-tolerance", type=float, default=0.02)
    args = parser.parse_args()
    checks = [c for c in CHECKS if args.only is None or c.preset in args.only]
    unknown = set(args.only or ()) - {c.preset for c in CHECKS}
    if unknown:
        parser.error(f"no check for {', '.join(sorted(unknown))}")
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        data = generate_data(tmp / "data", args)
        skipped, slowest = [], 0.0
        for check in checks:
            elapsed = time.monotonic() - start
            if elapsed + slowest > args.budget:  # the next check would likely overrun
                skipped.append(check.preset + "".join(f" {o}" for o in check.overrides))
                continue
            began = time.monotonic()
            try:
                with contextlib.redirect_stdout(sys.stderr):  # the runs' own prints
                    result = run_check(check, data, tmp, args)
                result["status"] = "ok"
            except Exception as err:  # a broken preset is reported; the next one still runs
                result = {"preset": check.preset, "status": f"failed: {type(err).__name__}: {err}"}
            result["seconds"] = round(time.monotonic() - began, 1)
            slowest = max(slowest, result["seconds"])
            print(json.dumps(result), flush=True)
    print(
        json.dumps(
            {
                "preset_steps": "done",
                "seconds": round(time.monotonic() - start, 1),
                "skipped": skipped,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
