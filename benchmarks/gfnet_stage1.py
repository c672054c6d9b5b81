"""One stage-1 epoch of GFNet with ResNet-50 encoders, P = 96, on generated ImageNet-format data:
training images/s (after a warm-up) and peak GPU memory, through dynlab's own training path.

Writes random 256x256 PNGs in the ImageNet layout (1000 class folders), composes
`+experiment=gfnet/resnet50_p96_imagenet phase=stage_1` on them and fits one epoch with the
given trainer (gpu: bf16-mixed). Prints one JSON object. Run (benchmarks/gpu_check.sh does):
  python3 benchmarks/gfnet_stage1.py --trainer gpu --batch-size 64 --per-class 4
Without a GPU the defaults are a CPU smoke run (batch 4, 1 image a class at 64x64, 8 steps).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from dynlab.apps._hydra import CONFIG_DIR
from dynlab.data.fake import write_fake_imagenet
from dynlab.runner import build_trainer
from dynlab.techniques.base import Phase
from dynlab.validation import build_run

WARMUP = 5


class Timer(pl.Callback):
    """Wall time and samples from the end of the warm-up steps to the end of the last step."""

    def __init__(self) -> None:
        self.start, self.end, self.samples = 0.0, 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        if batch_idx + 1 == WARMUP:
            self.start = time.perf_counter()
        elif batch_idx + 1 > WARMUP:
            self.end, self.samples = time.perf_counter(), self.samples + len(batch[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    parser.add_argument(
        "--trainer", default="gpu" if gpu else "cpu", help="src/dynlab/conf/trainer choice"
    )
    parser.add_argument("--batch-size", type=int, default=64 if gpu else 4)
    parser.add_argument("--per-class", type=int, default=4 if gpu else 1, help="images a class")
    parser.add_argument("--size", type=int, default=256 if gpu else 64, help="generated side")
    parser.add_argument("--steps", type=int, default=None if gpu else 8, help="train batches")
    parser.add_argument("--num-workers", type=int, default=8 if gpu else 0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_fake_imagenet(Path(tmp) / "imagenet", 1000, args.per_class, 1, size=args.size)
        overrides = [
            "+experiment=gfnet/resnet50_p96_imagenet",
            f"trainer={args.trainer}",
            f"dataset.root={root}",
            f"dataset.batch_size={args.batch_size}",
            f"dataset.num_workers={args.num_workers}",
            "dataset.val_size=100",
            "logger=none",
            "trainer.enable_progress_bar=false",
            "trainer.limit_val_batches=0",
            f"trainer.limit_train_batches={args.steps}" if args.steps else "trainer.max_epochs=1",
            "++technique.phases.stage_1.epochs=1",
            f"run_dir={tmp}/run",
        ]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        datamodule, module = build_run(cfg)
        phase = Phase("stage_1")
        module.start_phase(phase)
        timer = Timer()
        trainer = build_trainer(cfg, phase, False, [timer], module)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(module, datamodule=datamodule)
        seconds = max(timer.end - timer.start, 1e-9)
        print(
            json.dumps(
                {
                    "benchmark": "gfnet_stage1_resnet50_p96",
                    "trainer": args.trainer,
                    "precision": str(trainer.precision),
                    "batch_size": args.batch_size,
                    "steps": trainer.global_step,
                    "img_per_s": round(timer.samples / seconds, 1),
                    "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    if torch.cuda.is_available()
                    else None,
                }
            )
        )


if __name__ == "__main__":
    main()
