"""Early-exit inference speed: wall-clock speed-up of real early exit against MACs speed-up, in
eager PyTorch and in ONNX Runtime (the deploy form exported one graph per exit), side by side.

For a few budget levels, thresholds are calibrated with the real budgeted-batch code on fixed random
inputs; then early exit (samples leave the batch) is timed against the deploy form run to its last
exit and nothing more (the same stages with nobody leaving: no exit decisions, no extra heads), at
batch size 64 and 1, next to the MACs speed-up of the exits actually taken. Target (`TARGET`):
measured speed-up >= 0.8 x MACs speed-up. Prints one JSON object; per runtime and batch size:
`stage_time_speedup` (the speed-up the measured time to each exit allows at these exit fractions,
the bound a measured speed-up cannot pass by more than the noise), `seconds_to_each_exit` behind
it, `overhead_when_nobody_leaves` (early exit's decisions with nobody leaving / the last exit run
alone), and `noise_floor`: the same eager run timed twice as if it were two (`a_a_ratio`), the
resolution of every ratio here. Every figure is the median of `--repeats` interleaved passes.
With a `make_reference` (a static network, e.g. the plain backbone at full resolution), it is
timed alongside and each level also reports the speed-up over it next to the MACs ratio.
Run: `.venv/bin/python benchmarks/early_exit.py [--threads N] [--repeats R] [--form deploy|train]
[--no-onnx]`. Swap the model in `make_model` (and `make_reference`, `BATCHES` for slow models).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dynlab.evaluation import latency
from dynlab.evaluation.budgeted import budgeted_curve
from dynlab.evaluation.early_exit import early_exit_predict
from dynlab.evaluation.export import OnnxExits, export_onnx
from dynlab.evaluation.macs import count_macs
from dynlab.evaluation.outputs import collect_exit_probs
from dynlab.protocol import DynamicNet, ExitStage, StaticExits

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

    def export_stages(self) -> list[ExitStage]:
        return [CNNStage(stage, head) for stage, head in zip(self.stages, self.heads, strict=True)]


class CNNStage(ExitStage):
    """One conv stage and its exit: (features) -> (logits, features); the first takes the image."""

    def __init__(self, stage: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.stage, self.head = stage, head

    def forward(self, image: Tensor, *carried: Tensor) -> tuple[Tensor, Tensor]:
        features = self.stage(carried[0] if carried else image)
        return self.head(features), features


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
    runtimes: Mapping[str, nn.Module],
    exit_macs: list[float],
    curve: list[dict],
    batches: Sequence[Tensor],
    repeats: int,
    reference: tuple[nn.Module, float] | None = None,
) -> dict[str, object]:
    """For each runtime, early exit at each level against the same runtime run to its last exit
    (every pass interleaved with every other), next to the MACs of the exits actually taken;
    `reference` is a static network and its MACs, timed alongside in eager PyTorch."""
    nobody_leaves = [math.inf] * (len(exit_macs) - 1) + [0.0]
    passes: dict[str, Callable[[], list[float]]] = {}
    for name, model in runtimes.items():
        passes[f"{name}/last_exit"] = latency.exit_pass(model, batches, None)
        passes[f"{name}/nobody_leaves"] = latency.early_exit_pass(
            model, batches, nobody_leaves, None
        )
        for record in curve:
            passes[f"{name}/q={record['q']}"] = latency.early_exit_pass(
                model, batches, record["thresholds"], None
            )
    first = next(iter(runtimes))
    passes["again"] = latency.exit_pass(runtimes[first], batches, None)  # the A/A test
    if reference is not None:
        passes["reference"] = lambda: _timed_pass(reference[0], batches)
    times = latency.interleaved(passes, warmup=1, repeats=repeats)
    median = {
        name: [statistics.median(t[k] for t in ts) for k in range(len(ts[0]))]
        for name, ts in times.items()
    }
    macs = torch.tensor(exit_macs, dtype=torch.float64)
    exits = {
        r["q"]: torch.cat(
            [early_exit_predict(runtimes[first], b, r["thresholds"])[1] for b in batches]
        )
        for r in curve
    }
    report: dict[str, object] = {
        "samples": sum(len(b) for b in batches),
        "noise_floor": latency.noise_floor(times[f"{first}/last_exit"], times["again"]),
    }
    if reference is not None:
        report["reference_s"] = round(median["reference"][0], 5)
    for name in runtimes:
        to_exit = torch.tensor(median[f"{name}/last_exit"], dtype=torch.float64)
        full = float(to_exit[-1])
        levels = []
        for record in curve:
            taken = exits[record["q"]]
            fractions = torch.bincount(taken, minlength=len(macs)).double() / len(taken)
            avg_macs = float((fractions * macs).sum())
            macs_speedup = exit_macs[-1] / avg_macs
            seconds = median[f"{name}/q={record['q']}"][0]
            speedup = full / seconds
            level = {
                "q": record["q"],
                "exit_fractions": [round(float(f), 4) for f in fractions],
                "macs_speedup": round(macs_speedup, 3),
                "stage_time_speedup": round(full / float((fractions * to_exit).sum()), 3),
                "measured_speedup": round(speedup, 3),
                "measured_over_macs": round(speedup / macs_speedup, 3),
                "meets_target": speedup / macs_speedup >= TARGET,
            }
            if reference is not None:
                level |= {
                    "macs_ratio_over_reference": round(reference[1] / avg_macs, 3),
                    "speedup_over_reference": round(median["reference"][0] / seconds, 3),
                }
            levels.append(level)
        report[name] = {
            "last_exit_s": round(full, 5),
            "seconds_to_each_exit": [round(float(t), 5) for t in to_exit],
            "overhead_when_nobody_leaves": round(median[f"{name}/nobody_leaves"][0] / full, 3),
            "levels": levels,
        }
    return report


def _timed_pass(model: nn.Module, batches: Sequence[Tensor]) -> list[float]:
    begin = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return [time.perf_counter() - begin]


def _no_grad_call(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of both runtimes")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (the median is kept)")
    parser.add_argument("--form", choices=("deploy", "train"), default="deploy")
    parser.add_argument("--no-onnx", action="store_true", help="eager PyTorch only")
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
    runtimes: dict[str, nn.Module] = {"eager": model}
    report: dict[str, object] = {
        "form": args.form,
        "target_measured_over_macs": TARGET,
        "machine": latency.machine(),
        "repeats": args.repeats,
        "exit_macs": exit_macs,
    }
    with tempfile.TemporaryDirectory() as export_dir:
        if not args.no_onnx and args.form == "deploy":
            manifest = export_onnx(model, input_size, export_dir, images=test_x[:8])
            runtimes["onnxruntime"] = OnnxExits(export_dir, threads=args.threads)
            report["onnx_parity_max_abs_diff"] = manifest["parity"]["max_abs_diff"]
        reference = None
        if make_reference is not None:
            static = StaticExits(make_reference()).eval().deploy()
            reference = (static.net, static.exit_macs(input_size)[0])
            report["reference_macs"] = reference[1]
        for batch_size, num_batches in BATCHES.items():
            batches = list(test_x[: batch_size * num_batches].split(batch_size))
            report[f"batch_{batch_size}"] = measure(
                runtimes, exit_macs, curve, batches, args.repeats, reference
            )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
