"""SPOS supernet training step vs the same path built standalone, side by side (target <= 1.15x).

One training step (forward, cross-entropy, backward, SGD momentum 0.9 with weight decay over all
of the net's parameters, `zero_grad(set_to_none=True)`) of the one-shot supernet on a fixed path
(`SPOSSupernet.set_path`) against the standalone net of that path cut out of it
(`SPOSSupernet.child`: the same weights and the same non-affine BatchNorm, so the two compute the
same function and differ only in how the path is run). The runs take turns over interleaved rounds
(the first a warm-up) and the best round counts, as in `early_exit.best_seconds`. Paths: the
official searched architecture, all-0 (ShuffleNet 3x3), all-3 (Xception), and with channel search
(the supernet built at 2.0x, a narrower width sliced out of it) the official architecture at 1.0x
and at 0.4x. Target (`TARGET`): supernet step / standalone step <= 1.15 on every path.

Also reported: the technique's own per-step Python work (drawing a path from (seed, step),
`set_path`, the grad clearing of `SPOSModule.on_before_optimizer_step`) and the supernet's
training img/s with a new uniform path every step, plus peak GPU memory on a GPU. Every step uses
one fixed random batch already on the device (no data loading: the model's cost alone).

CPU default: the full 20-layer CIFAR space (`cifar_spos_supernet`), 3x32x32, batch 64, fp32, one
thread: `.venv/bin/python benchmarks/spos_supernet.py [--threads N]`.
GPU (`benchmarks/gpu_check.sh`): the ImageNet space (`spos_supernet`) at 224, batch 256, bf16
autocast: `python3 benchmarks/spos_supernet.py --device cuda [--channels-last]`.
The GPU code path on a CPU (a smoke run, figures meaningless):
`.venv/bin/python benchmarks/spos_supernet.py --device cpu --space imagenet --image-size 64
--batch-size 4 --steps 1 --repeats 1 --random-steps 2`.
Prints one JSON object on one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from early_exit import add_supernet_arguments, resolve_supernet_arguments
from early_exit import best_seconds as interleaved
from torch import Tensor, nn

from dynlab.backbones.spos_shufflenetv2 import (
    CHANNEL_SCALES,
    OFFICIAL_ARCH,
    MacsTable,
    SPOSSupernet,
    cifar_spos_supernet,
    spos_supernet,
)
from dynlab.search import derived_seed
from dynlab.techniques.spos.config import SamplerConfig
from dynlab.techniques.spos.module import PATH_STREAM, SPOSModule
from dynlab.techniques.spos.sampling import PathSampler

TARGET = 1.15  # supernet step / standalone step on the same path
SPACES = {  # name -> (timm builder, classes, default image side, batch, precision)
    "cifar": (cifar_spos_supernet, 10, 32, 64, "fp32"),
    "imagenet": (spos_supernet, 1000, 224, 256, "bf16"),
}
LAYERS = len(OFFICIAL_ARCH)
NARROW, UNIT = CHANNEL_SCALES.index(0.4), CHANNEL_SCALES.index(1.0)
# (name, channel search, genes); the 20-layer spaces both have len(OFFICIAL_ARCH) layers.
PATHS = (
    ("official", False, OFFICIAL_ARCH),
    ("all_0", False, (0,) * LAYERS),
    ("all_3", False, (3,) * LAYERS),
    ("channels_official_1.0x", True, OFFICIAL_ARCH + (UNIT,) * LAYERS),
    ("channels_official_0.4x", True, OFFICIAL_ARCH + (NARROW,) * LAYERS),
)


class Stepper:
    """One training step of a net on a fixed batch, with its own SGD (as the technique's recipe:
    momentum 0.9, no Nesterov, weight decay 4e-5; lr small so the weights stay sane)."""

    def __init__(self, net: nn.Module, x: Tensor, y: Tensor, precision: str) -> None:
        self.net, self.x, self.y = net.train(), x, y
        self.optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=4e-5)
        self.autocast = torch.autocast(
            x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"
        )

    def __call__(self) -> None:
        with self.autocast:
            loss = F.cross_entropy(self.net(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(
    runs: Mapping[str, Callable[[], None]], steps: int, repeats: int, device: torch.device
) -> dict[str, float]:
    """Best wall-clock seconds per step of each run over `repeats` rounds of `steps` steps, the
    runs taking turns within each round (`early_exit.best_seconds`; the first round is a warm-up)."""
    steps_of = {name: (lambda _, run=run: run()) for name, run in runs.items()}
    passes = interleaved(steps_of, [None] * steps, repeats, sync=lambda: synchronize(device))
    return {name: seconds / steps for name, seconds in passes.items()}


def build_supernet(
    space: str, channel_search: bool, device: torch.device, channels_last: bool
) -> SPOSSupernet:
    """The space's supernet (seeded, so every run builds the same weights) on `device`."""
    builder, classes, *_ = SPACES[space]
    torch.manual_seed(0)
    net = builder(num_classes=classes, channel_search=channel_search).to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def compare_paths(
    args: argparse.Namespace, x: Tensor, y: Tensor, tables: dict[bool, MacsTable]
) -> list[dict[str, object]]:
    """Supernet vs standalone step time on every path of PATHS (one pair of nets at a time)."""
    results = []
    for name, channel_search, genes in PATHS:
        supernet = build_supernet(args.space, channel_search, x.device, args.channels_last)
        supernet.set_path(genes)
        child = supernet.child(genes)
        if args.channels_last:
            child = child.to(memory_format=torch.channels_last)
        runs = {
            "supernet": Stepper(supernet, x, y, args.precision),
            "standalone": Stepper(child, x, y, args.precision),
        }
        seconds = best_seconds(runs, args.steps, args.repeats, x.device)
        ratio = seconds["supernet"] / seconds["standalone"]
        results.append(
            {
                "path": name,
                "channel_search": channel_search,
                "mmacs": round(tables[channel_search].macs(genes) / 1e6, 2),
                "supernet_s": round(seconds["supernet"], 5),
                "standalone_s": round(seconds["standalone"], 5),
                "ratio": round(ratio, 3),
                "meets_target": ratio <= TARGET,
            }
        )
        del supernet, child, runs
    return results


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Peak GPU memory (GiB) allocated inside the block; None off the GPU."""
    out: dict[str, float | None] = {"gib": None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield out
    if device.type == "cuda":
        out["gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def random_path_training(
    args: argparse.Namespace, x: Tensor, y: Tensor, table: MacsTable
) -> dict[str, object]:
    """The supernet's training img/s with a new uniform path every step, drawn and cleared as the
    technique does, and the technique's per-step Python work alone (no model run) next to it."""
    supernet = build_supernet(args.space, False, x.device, args.channels_last)
    sampler = PathSampler(supernet.space, table, SamplerConfig())
    step = Stepper(supernet, x, y, args.precision)
    # `SPOSModule.on_before_optimizer_step` itself, on a stand-in for the module: only the
    # attributes it reads.
    module = SimpleNamespace(current_phase="supernet", _supernet=supernet, space=supernet.space)
    module._choice_params = SPOSModule._choice_params.func(module)  # type: ignore[attr-defined]

    def hooks(global_step: int) -> None:
        # SPOSModule.training_step's draw: the same path on every rank, from (seed, step).
        rng = np.random.default_rng(derived_seed(0, PATH_STREAM, global_step))
        supernet.set_path(sampler.sample(rng))

    def train(global_step: int) -> None:
        hooks(global_step)
        with step.autocast:
            loss = F.cross_entropy(supernet(x), y)
        loss.backward()
        SPOSModule.on_before_optimizer_step(module, step.optimizer)  # type: ignore[arg-type]
        step.optimizer.step()
        step.optimizer.zero_grad(set_to_none=True)

    with peak_memory(x.device) as peak:
        for s in range(args.random_warmup):
            train(s)
        synchronize(x.device)
        begin = time.perf_counter()
        for s in range(args.random_warmup, args.random_warmup + args.random_steps):
            train(s)
        synchronize(x.device)
        seconds = time.perf_counter() - begin
    iterations = 200
    begin = time.perf_counter()
    for s in range(iterations):
        hooks(s)
        SPOSModule.on_before_optimizer_step(module, step.optimizer)  # type: ignore[arg-type]
    hook_seconds = (time.perf_counter() - begin) / iterations
    return {
        "steps": args.random_steps,
        "step_s": round(seconds / args.random_steps, 5),
        "img_per_s": round(args.random_steps * len(x) / seconds, 1),
        "technique_python_per_step_ms": round(hook_seconds * 1e3, 3),
        "technique_python_fraction": round(hook_seconds * args.random_steps / seconds, 4),
        "peak_gpu_mem_gib": peak["gib"],
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_supernet_arguments(parser, SPACES, imagenet_batch=256, cpu_steps=3)
    parser.add_argument("--random-steps", type=int, help="timed random-path steps")
    parser.add_argument("--random-warmup", type=int, help="random-path warm-up steps")
    args = parser.parse_args()
    cuda = resolve_supernet_arguments(args, SPACES, cpu_steps=3)
    args.random_steps = args.random_steps or (30 if cuda else 8)
    args.random_warmup = args.random_warmup if args.random_warmup is not None else 10 if cuda else 2
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    _, classes, *_ = SPACES[args.space]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    y = torch.randint(0, classes, (args.batch_size,), generator=generator)
    x, y = x.to(device), y.to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    size = (3, args.image_size, args.image_size)
    space_kwargs = {"num_classes": classes, "cifar_stem": args.space == "cifar"}
    tables = {
        cs: MacsTable.measure({**space_kwargs, "channel_search": cs}, size) for cs in (False, True)
    }
    started = time.perf_counter()
    paths = compare_paths(args, x, y, tables)
    random_path = random_path_training(args, x, y, tables[False])
    report = {
        "benchmark": "spos_supernet_step",
        "space": args.space,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "torch_threads": torch.get_num_threads(),
        "steps_per_round": args.steps,
        "repeats": args.repeats,
        "target_ratio_at_most": TARGET,
        "meets_target": all(p["meets_target"] for p in paths),
        "paths": paths,
        "random_path_training": random_path,
        "seconds": round(time.perf_counter() - started, 1),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
