"""Training throughput: dynlab's Lightning path vs a hand-written PyTorch loop, side by side.

Same model, same data loader (dynlab's train loader of `--dataset`), same batch size, optimiser,
device, precision and memory format; images/s over the steps after a warm-up. Target: ratio
>= 0.95. `--compare-channels-last` also runs dynlab's path with channels-last off (the
"before" of that speed-up), interleaved with the rest.
Run: .venv/bin/python benchmarks/throughput.py [--steps 60 --batch-size 64]
     .venv/bin/python benchmarks/throughput.py --dataset fashion_mnist --batch-size 128 \
         --compare-channels-last
GPU (benchmarks/gpu_check.sh): --trainer gpu --batch-size 256, or
--trainer gpu --backbone timm --backbone-name resnet50 --image-size 224 --batch-size 128.
"""

from __future__ import annotations

import argparse
import json
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from dynlab.apps._hydra import CONFIG_DIR
from dynlab.building import build_datamodule, build_module
from dynlab.runner import build_trainer
from dynlab.techniques.base import Phase

WARMUP = 5


def compose_run(args: argparse.Namespace, run_dir: str, channels_last: bool = True):
    if args.dataset == "synthetic":
        data = [
            "dataset=synthetic",
            f"dataset.num_train={args.steps * args.batch_size + 256}",
            f"dataset.image_size={args.image_size}",
        ]
    else:
        data = [f"dataset={args.dataset}"]
    overrides = [
        "technique=baseline",
        *data,
        f"channels_last={channels_last}",
        f"dataset.batch_size={args.batch_size}",
        f"dataset.num_workers={args.num_workers}",
        "dataset.augment=true",
        f"backbone={args.backbone}",
        f"trainer={args.trainer}",
        "logger=none",
        "trainer.enable_progress_bar=false",
        f"trainer.max_steps={args.steps}",
        "trainer.limit_val_batches=0",
        f"run_dir={run_dir}",
    ]
    if args.backbone_name:
        overrides.append(f"backbone.name={args.backbone_name}")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


class StepTimer(pl.Callback):
    """Wall time from the end of the warm-up steps to the end of the last step."""

    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        if batch_idx + 1 == WARMUP:
            self.start = time.perf_counter()
        elif batch_idx + 1 > WARMUP:
            self.end, self.steps = time.perf_counter(), self.steps + 1


def lightning_images_per_s(cfg, batch_size: int) -> float:
    pl.seed_everything(0, verbose=False)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    timer = StepTimer()
    trainer = build_trainer(cfg, Phase("bench"), False, [timer], module)
    trainer.fit(module, datamodule=datamodule)
    return timer.steps * batch_size / (timer.end - timer.start)


def plain_images_per_s(cfg, batch_size: int, steps: int) -> float:
    """The same training steps in a hand-written loop on the trainer's device and precision."""
    pl.seed_everything(0, verbose=False)
    device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
    autocast = torch.autocast(device.type, torch.bfloat16, enabled="bf16" in cfg.trainer.precision)
    datamodule = build_datamodule(cfg)
    model = build_module(cfg, datamodule).model.to(device).train()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optim = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    loader = datamodule.train_dataloader()
    start = 0.0
    for step, (x, y) in enumerate(loader, start=1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            loss = F.cross_entropy(model(x), y)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if step == WARMUP:
            _sync(device)
            start = time.perf_counter()
        if step == steps:
            break
    _sync(device)
    return (steps - WARMUP) * batch_size / (time.perf_counter() - start)


def loader_images_per_s(cfg, batch_size: int, steps: int) -> float:
    """The data pipeline alone (sampling, uint8 crop/flip, normalising, collating): what a step's
    data costs next to its compute."""
    datamodule = build_datamodule(cfg)
    start = 0.0
    for step, _ in enumerate(datamodule.train_dataloader(), start=1):
        if step == WARMUP:
            start = time.perf_counter()
        if step == steps:
            break
    return (steps - WARMUP) * batch_size / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--trainer", default="cpu", help="a src/dynlab/conf/trainer choice (cpu, gpu)"
    )
    parser.add_argument(
        "--backbone", default="cifar_resnet20", help="a src/dynlab/conf/backbone choice"
    )
    parser.add_argument("--backbone-name", default=None, help="backbone.name (timm models)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--dataset", default="synthetic", help="synthetic, fashion_mnist, ...")
    parser.add_argument("--compare-channels-last", action="store_true")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_run(args, run_dir)
        before = compose_run(args, run_dir, channels_last=False)
        plain, lightning, nchw, data = [], [], [], []
        for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
            data.append(loader_images_per_s(cfg, args.batch_size, args.steps))
            plain.append(plain_images_per_s(cfg, args.batch_size, args.steps))
            lightning.append(lightning_images_per_s(cfg, args.batch_size))
            if args.compare_channels_last:
                nchw.append(lightning_images_per_s(before, args.batch_size))
    best_plain, best_lightning = max(plain), max(lightning)
    extra = {}
    if nchw:
        extra = {
            "dynlab_channels_first_images_per_s": round(max(nchw), 1),
            "channels_last_speedup": round(best_lightning / max(nchw), 3),
        }
    print(
        json.dumps(
            {
                "benchmark": "training_throughput",
                "model": cfg.backbone.name,
                "dataset": args.dataset,
                "input_size": list(build_datamodule(cfg).info.input_size),
                "trainer": args.trainer,
                "precision": cfg.trainer.precision,
                "device": torch.cuda.get_device_name() if args.trainer == "gpu" else "cpu",
                "batch_size": args.batch_size,
                "threads": torch.get_num_threads(),
                "data_only_images_per_s": round(max(data), 1),
                "plain_images_per_s": round(best_plain, 1),
                "dynlab_lightning_images_per_s": round(best_lightning, 1),
                "ratio": round(best_lightning / best_plain, 3),
                "target_ratio": 0.95,
                "repeats": args.repeats,
                **extra,
            }
        )
    )


if __name__ == "__main__":
    main()
