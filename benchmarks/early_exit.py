"""Early-exit inference speed: wall-clock speed-up of `early_exit_predict` against MACs speed-up.

For a few budget levels, thresholds are calibrated with the real budgeted-batch code on fixed random
inputs; then early exit (samples leave the batch) is timed against running every exit
(`forward_exits`) at batch size 64 and 1, next to the MACs speed-up of the exits actually taken.
Target (`TARGET`): measured speed-up >= 0.8 x MACs speed-up. Prints one JSON object:
`overhead_when_nobody_leaves` (early exit with no sample leaving / every exit) is the exit
machinery's own cost, and
`stage_time_speedup` (the speed-up the measured time per stage allows at these exit fractions)
shows how well MACs predict time for the model (a full-resolution first stage costs more per MAC),
and `seconds_to_each_exit` the per-stage timings behind it. The model is timed in its deploy form
(`deploy()`: BatchNorm folded, what evaluation runs on); `--form train` times the training form.
With a `make_reference` (a static network, e.g. the plain backbone at full resolution), it is
timed alongside and each level also reports the speed-up over it next to the MACs ratio.
Run: `.venv/bin/python benchmarks/early_exit.py [--threads N] [--repeats R] [--form deploy|train]`.
Swap the model in `make_model` (and `make_reference`, `BATCHES` for slow models).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dynlab.evaluation.budgeted import budgeted_curve
from dynlab.evaluation.early_exit import early_exit_predict
from dynlab.evaluation.macs import count_macs
from dynlab.evaluation.outputs import collect_exit_probs
from dynlab.protocol import DynamicNet, StaticExits

LEVELS = (0.25, 0.5, 1.0, 2.0)  # budget levels q (MSDNet's exit law p_k ∝ q^k)
TARGET = 0.8  # measured speed-up / MACs speed-up wanted at every level
BATCHES = {64: 4, 1: 64}  # batch size -> number of test batches timed
NUM_CALIBRATION = 1024


class MultiExitCNN(DynamicNet):
    """Four conv stages (32x32 -> 4x4) with a pooled linear classifier after each stage."""

    def __init__(
        self, num_classes: int = 100, widths: tuple[int, ...] = (32, 64, 128, 256)
    ) -> None:
        super().__init__()
        channels = (3, *widths)
        self.stages = nn.ModuleList(
            nn.Sequential(
                conv_bn_relu(channels[i], channels[i + 1], stride=1 if i == 0 else 2),
                conv_bn_relu(channels[i + 1], channels[i + 1], stride=1),
            )
            for i in range(len(widths))
        )
        self.heads = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, num_classes))
            for w in widths
        )

    def run_exits(self, x: Tensor, num_exits: int) -> list[Tensor]:
        """Logits of the first `num_exits` exits."""
        logits = []
        for stage, head in zip(self.stages[:num_exits], self.heads[:num_exits], strict=True):
            x = stage(x)
            logits.append(head(x))
        return logits

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return self.run_exits(x, len(self.stages))

    def exit_macs(self, input_size: tuple[int, int, int]) -> list[float]:
        return [
            float(count_macs(lambda x, k=k: self.run_exits(x, k), input_size, module=self))
            for k in range(1, len(self.stages) + 1)
        ]

    def exit_session(self, x: Tensor) -> StageSession:
        return StageSession(self, x)


class StageSession:
    """Runs one stage per exit on the samples still in the batch."""

    def __init__(self, model: MultiExitCNN, x: Tensor) -> None:
        self.model, self.features, self.done = model, x, 0
        self.num_exits = len(model.stages)

    def next_exit(self) -> Tensor:
        self.features = self.model.stages[self.done](self.features)
        self.done += 1
        return self.model.heads[self.done - 1](self.features)

    def keep(self, mask: Tensor) -> None:
        self.features = self.features[mask]


def conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def make_model() -> tuple[nn.Module, tuple[int, int, int]]:
    """The dynamic model under test (answering dynlab.protocol) and its input size (C, H, W)."""
    return MultiExitCNN(), (3, 32, 32)


# A static network to compare with (its deploy form is timed), or None.
make_reference: Callable[[], nn.Module] | None = None


def add_supernet_arguments(
    parser: argparse.ArgumentParser, spaces: Mapping[str, Any], imagenet_batch: int, cpu_steps: int
) -> None:
    """The options the supernet-step benchmarks share (device, space, size, precision, rounds)."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--trainer", choices=("cpu", "gpu"), help="as gpu_check.sh's bench passes: gpu = cuda"
    )
    parser.add_argument("--space", choices=tuple(spaces), help="default: imagenet on cuda")
    parser.add_argument("--image-size", type=int, help="default: 224 imagenet, 32 cifar")
    parser.add_argument(
        "--batch-size", type=int, help=f"default: {imagenet_batch} imagenet, 64 cifar"
    )
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="bf16: autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--steps", type=int, help=f"steps a round (default: 10 cuda, {cpu_steps} cpu)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best one is kept)")


def resolve_supernet_arguments(
    args: argparse.Namespace, spaces: Mapping[str, Sequence[Any]], cpu_steps: int
) -> bool:
    """Fill the shared options' defaults from the space's entry (its last three fields: image
    size, batch size, precision); True when the run is on CUDA."""
    if args.trainer == "gpu":
        args.device = "cuda"
    cuda = args.device.startswith("cuda")
    args.space = args.space or ("imagenet" if cuda else "cifar")
    *_, side, batch, precision = spaces[args.space]
    args.image_size = args.image_size or side
    args.batch_size = args.batch_size or batch
    args.precision = args.precision or precision
    args.steps = args.steps or (10 if cuda else cpu_steps)
    return cuda


def inference(net: nn.Module) -> Callable[[Tensor], Tensor]:
    """`net`'s forward on one batch without autograd, as a run for `best_seconds`."""

    def call(batch: Tensor) -> Tensor:
        with torch.no_grad():
            return net(batch)

    return call


def best_seconds(
    runs: Mapping[str, Callable[[Any], object]],
    batches: Sequence[Any],
    repeats: int,
    sync: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Best wall-clock time of a pass over `batches` for each run, the runs taking turns so that
    all of them see the same machine load (the first round is a warm-up and is not counted).
    `sync` (a CUDA synchronise) runs before and after each timed pass."""
    best = dict.fromkeys(runs, math.inf)
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            if sync is not None:
                sync()
            begin = time.perf_counter()
            for batch in batches:
                run(batch)
            if sync is not None:
                sync()
            if round_ > 0:
                best[name] = min(best[name], time.perf_counter() - begin)
    return best


def seconds_to_each_exit(model: nn.Module, batches: Sequence[Tensor], repeats: int = 5) -> Tensor:
    """Cumulative time [K] to reach each exit over a pass of `batches` with nobody leaving (best of
    `repeats`): what early exit can save at best if stage costs did not depend on batch size."""
    best = None
    with torch.no_grad():
        for _ in range(repeats):
            totals = None
            for batch in batches:
                session = model.exit_session(batch)
                begin = time.perf_counter()
                reached = []
                for _ in range(session.num_exits):
                    session.next_exit()
                    reached.append(time.perf_counter() - begin)
                totals = torch.tensor(reached) if totals is None else totals + torch.tensor(reached)
            best = totals if best is None else torch.minimum(best, totals)
    return best


def calibrated_levels(
    model: nn.Module, exit_macs: list[float], val_x: Tensor, test_x: Tensor
) -> list[dict]:
    """Budgeted-curve records at LEVELS, calibrated on val_x by the real budgeted code."""
    loader = [
        DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=64)
        for x in (val_x, test_x)
    ]
    val, test = (collect_exit_probs(model, lo) for lo in loader)
    return budgeted_curve(*val, *test, exit_macs, qs=LEVELS)


def measure(
    model: nn.Module,
    exit_macs: list[float],
    curve: list[dict],
    batches: Sequence[Tensor],
    repeats: int,
    reference: tuple[nn.Module, float] | None = None,
) -> dict[str, object]:
    """Time every exit vs early exit at each level, next to the MACs of the exits actually taken;
    `reference` is a static network and its MACs, timed alongside."""

    def every_exit(x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            return model.forward_exits(x)

    # Nobody leaving early isolates the cost of the exit machinery from the model's MACs/time.
    nobody_leaves = [math.inf] * (len(exit_macs) - 1) + [0.0]
    runs = {
        "every_exit": every_exit,
        "nobody_leaves": partial(early_exit_predict, model, thresholds=nobody_leaves),
    }
    runs |= {
        f"q={r['q']}": partial(early_exit_predict, model, thresholds=r["thresholds"]) for r in curve
    }
    if reference is not None:
        runs["reference"] = partial(_no_grad_call, reference[0])
    seconds = best_seconds(runs, batches, repeats)
    to_exit = seconds_to_each_exit(model, batches, repeats).double()
    macs = torch.tensor(exit_macs, dtype=torch.float64)
    levels = []
    for record in curve:
        name = f"q={record['q']}"
        exits = torch.cat([runs[name](b)[1] for b in batches])
        macs_speedup = exit_macs[-1] / float(macs[exits].mean())
        speedup = seconds["every_exit"] / seconds[name]
        fractions = torch.bincount(exits, minlength=len(macs)) / len(exits)
        levels.append(
            {
                "q": record["q"],
                "exit_fractions": fractions.tolist(),
                "macs_speedup": round(macs_speedup, 3),
                "stage_time_speedup": round(float(to_exit[-1] / (fractions * to_exit).sum()), 3),
                "measured_speedup": round(speedup, 3),
                "measured_over_macs": round(speedup / macs_speedup, 3),
                "meets_target": speedup / macs_speedup >= TARGET,
            }
        )
        if reference is not None:
            avg_macs = float(macs[exits].mean())
            levels[-1] |= {
                "macs_ratio_over_reference": round(reference[1] / avg_macs, 3),
                "speedup_over_reference": round(seconds["reference"] / seconds[name], 3),
            }
    return {
        "samples": sum(len(b) for b in batches),
        "every_exit_s": round(seconds["every_exit"], 4),
        **({"reference_s": round(seconds["reference"], 4)} if reference is not None else {}),
        "overhead_when_nobody_leaves": round(seconds["nobody_leaves"] / seconds["every_exit"], 3),
        "seconds_to_each_exit": [round(float(t), 5) for t in to_exit],
        "levels": levels,
    }


def _no_grad_call(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (best one is kept)")
    parser.add_argument("--form", choices=("deploy", "train"), default="deploy")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, input_size = make_model()
    model.eval()
    if args.form == "deploy":
        model = model.deploy()
    exit_macs = model.exit_macs(input_size)
    generator = torch.Generator().manual_seed(0)
    val_x = torch.randn(NUM_CALIBRATION, *input_size, generator=generator)
    test_x = torch.randn(max(b * n for b, n in BATCHES.items()), *input_size, generator=generator)
    curve = calibrated_levels(model, exit_macs, val_x, test_x)
    reference = None
    if make_reference is not None:
        static = StaticExits(make_reference()).eval().deploy()
        reference = (static.net, static.exit_macs(input_size)[0])
    report: dict[str, object] = {
        "form": args.form,
        "target_measured_over_macs": TARGET,
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "exit_macs": exit_macs,
        **({"reference_macs": reference[1]} if reference is not None else {}),
    }
    for batch_size, num_batches in BATCHES.items():
        batches = test_x[: batch_size * num_batches].split(batch_size)
        report[f"batch_{batch_size}"] = measure(
            model, exit_macs, curve, batches, args.repeats, reference
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
