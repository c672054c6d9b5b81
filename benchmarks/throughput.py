"""Training throughput: dynlab's Lightning path vs a hand-written PyTorch loop, side by side.

Same model (CIFAR ResNet-20), same data loader (dynlab's synthetic train loader), same batch size
and optimiser; images/s over the steps after a warm-up. Target: ratio >= 0.95 on CPU.
Run: .venv/bin/python benchmarks/throughput.py [--steps 60 --batch-size 64]
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
from dynlab.runner import build_datamodule, build_module, build_trainer
from dynlab.techniques.base import Phase

WARMUP = 5


def compose_run(steps: int, batch_size: int, run_dir: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "dataset=synthetic",
                f"dataset.num_train={steps * batch_size + 256}",
                f"dataset.batch_size={batch_size}",
                "dataset.augment=true",
                "backbone=cifar_resnet20",
                "logger=none",
                "trainer.enable_progress_bar=false",
                f"trainer.max_steps={steps}",
                "trainer.limit_val_batches=0",
                f"run_dir={run_dir}",
            ],
        )


class StepTimer(pl.Callback):
    """Wall time from the end of the warm-up steps to the end of the last step."""

    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == WARMUP:
            self.start = time.perf_counter()
        elif batch_idx + 1 > WARMUP:
            self.end, self.steps = time.perf_counter(), self.steps + 1


def lightning_images_per_s(cfg, batch_size: int) -> float:
    pl.seed_everything(0, verbose=False)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    timer = StepTimer()
    trainer = build_trainer(cfg, Phase("bench"), logger=False, extra_callbacks=[timer])
    trainer.fit(module, datamodule=datamodule)
    return timer.steps * batch_size / (timer.end - timer.start)


def plain_images_per_s(cfg, batch_size: int, steps: int) -> float:
    pl.seed_everything(0, verbose=False)
    datamodule = build_datamodule(cfg)
    model = build_module(cfg, datamodule).model.train()
    optim = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    loader = datamodule.train_dataloader()
    start = 0.0
    for step, (x, y) in enumerate(loader, start=1):
        loss = F.cross_entropy(model(x), y)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if step == WARMUP:
            start = time.perf_counter()
        if step == steps:
            break
    return (steps - WARMUP) * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_run(args.steps, args.batch_size, run_dir)
        plain, lightning = [], []
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            plain.append(plain_images_per_s(cfg, args.batch_size, args.steps))
            lightning.append(lightning_images_per_s(cfg, args.batch_size))
    best_plain, best_lightning = max(plain), max(lightning)
    print(
        json.dumps(
            {
                "benchmark": "training_throughput",
                "model": "cifar_resnet20",
                "batch_size": args.batch_size,
                "threads": torch.get_num_threads(),
                "plain_images_per_s": round(best_plain, 1),
                "dynlab_lightning_images_per_s": round(best_lightning, 1),
                "ratio": round(best_lightning / best_plain, 3),
                "target_ratio": 0.95,
            }
        )
    )


if __name__ == "__main__":
    main()
