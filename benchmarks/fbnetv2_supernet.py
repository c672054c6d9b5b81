"""FBNetV2 DMaskingNAS supernet: training step time and peak memory vs the widest standalone net
(target <= 1.3x each).

Runs, each one training step on one fixed random batch already on the device (no data loading):
- `standalone`: the widest network of the space built with `FBNetV2Supernet.standalone` (every
  stage width and expansion at its largest option, kernel 5, SE on, the largest resolution), a
  plain `FBNetV2Net`;
- `supernet`: the supernet in train mode as the search trains it: Gumbel-softmax weights drawn
  every forward (temperature `FBNetV2Config.temperature`), channel masks, the kernel and SE mixes,
  and one body pass per resolution option;
- `supernet_one_resolution`: the same supernet built with `resolutions=(largest,)`, i.e. masks and
  mixes but one body pass: the gap to `standalone` is the cost of masking, the gap to `supernet`
  the cost of the resolution passes;
- `search_step`: `FBNetV2Module.training_step`'s search step after the warm-up, re-enacted with the
  technique's own pieces (Gumbel noise from `seeded(derived_seed(seed, GUMBEL_STREAM, step,
  stream))`, `expected_macs`, `search_loss`): a weights step (CE on one batch, SGD over the
  weights) and an architecture step (CE * alpha * log(cost)^beta on a second batch, Adam on the
  logits), each zero_grad(set_to_none) / backward / step as `DynlabModule.manual_step` (no LR
  schedulers, no gradient clipping; one SGD parameter group).
The three plain steps use `spos_supernet.Stepper` (forward, cross-entropy, backward, SGD with
momentum and weight decay over every parameter, `zero_grad(set_to_none=True)`); the runs take
turns over interleaved rounds, the first a warm-up, and the best round counts
(`spos_supernet.best_seconds`).

Memory, each run built alone and measured over one step after a warm-up step:
- `saved_mib` (any device): the peak of the bytes autograd holds for backward, counted with
  `torch.autograd.graph.saved_tensors_hooks`: each distinct storage saved during the forward is
  counted once while any saved reference to it is alive, parameters excluded (their bf16 copies
  under autocast are counted); the peak is reached at the end of a forward. It leaves out the
  parameters, gradients and optimiser state (about equal on both sides: the supernet's weights are
  the widest net's plus a few hundred logits) and transient buffers (temporaries, gradients of
  activations during backward);
- `peak_gpu_gib` (CUDA): `torch.cuda.max_memory_allocated` over the step: everything, parameters,
  gradients, optimiser state and the batch included.
The memory target is judged on `peak_gpu_gib` on a GPU and on `saved_mib` elsewhere.

Also reported: the MACs of the widest net at every resolution option (`expected_macs` of the
supernet fixed there, equal to `count_macs` of the child), whose sum over the options is what the
supernet's passes compute, and the search step's cost-and-Adam part alone.

CPU default: the full CIFAR space (`cifar_fbnetv2_supernet`), 3x32x32, batch 64, fp32, one
thread: `.venv/bin/python benchmarks/fbnetv2_supernet.py [--threads N]`.
GPU (`benchmarks/gpu_check.sh`): the F space (`fbnetv2_f_supernet`) at 224, batch 128, bf16
autocast: `python3 benchmarks/fbnetv2_supernet.py --device cuda [--channels-last]`.
The GPU code path on a CPU (a smoke run, figures meaningless; an image smaller than the space's
largest option gets the largest multiples of the total stride that fit, here 64 and 32):
`.venv/bin/python benchmarks/fbnetv2_supernet.py --device cpu --space imagenet --image-size 64
--batch-size 2`.
Prints one JSON object on one line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from early_exit import add_supernet_arguments, resolve_supernet_arguments
from spos_supernet import Stepper, best_seconds, peak_memory, synchronize
from torch import Tensor

from dynlab.backbones.fbnetv2 import (
    SPACES as FBNET_SPACES,
)
from dynlab.backbones.fbnetv2 import (
    FBNetV2Supernet,
    cifar_fbnetv2_supernet,
    fbnetv2_f_supernet,
)
from dynlab.search import derived_seed, seeded
from dynlab.techniques.fbnetv2.config import FBNetV2Config
from dynlab.techniques.fbnetv2.module import GUMBEL_STREAM, search_loss

TARGET = 1.3  # supernet / widest standalone, step time and peak memory
SPACES = {  # name -> (timm builder, backbone space preset, classes, image side, batch, precision)
    "cifar": (cifar_fbnetv2_supernet, "cifar", 10, 32, 64, "fp32"),
    "imagenet": (fbnetv2_f_supernet, "fbnetv2_f", 1000, 224, 128, "bf16"),
}
RUNS = ("standalone", "supernet", "supernet_one_resolution", "search_step")
# src/dynlab/conf/technique/fbnetv2.yaml's search optimisers (weights: SGD 0.9 / wd 1e-4, its lr 0.1 scaled
# down so that the weights stay sane over the timed steps; arch: Adam 0.01, wd 5e-4).
WEIGHTS_SGD = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}
ARCH_ADAM = {"lr": 0.01, "weight_decay": 5e-4}


def default_resolutions(space: str, image_size: int) -> tuple[int, ...]:
    """The space's resolution options when they fit the image; otherwise (a smoke run on small
    images) the largest multiples of the space's total stride that fit, as many as the space has
    options, at most: the supernet only subsamples, and its maps must land pixel for pixel."""
    preset = FBNET_SPACES[SPACES[space][1]]
    options = tuple(preset["resolutions"])
    if max(options) <= image_size:
        return options
    stride = preset["stem_stride"] * math.prod(preset["strides"])
    fitting = range(image_size // stride * stride, 0, -stride)
    return tuple(fitting)[: len(options)]


def widest_choices(net: FBNetV2Supernet) -> dict[str, Any]:
    """Every stage width and hidden width at its largest option, the largest kernel, SE on and
    the largest resolution."""
    blocks = len(net.search_blocks)
    return {
        "resolution": net.full_index,
        "widths": [max(range(len(w)), key=w.__getitem__) for w in net.stage_widths],
        "expansions": [max(range(len(b.mids)), key=b.mids.__getitem__) for b in net.search_blocks],
        "kernels": [net.kernels.index(max(net.kernels))] * blocks,
        "se": [net.se_options.index(True)] * blocks,
    }


def build_supernet(
    args: argparse.Namespace, resolutions: tuple[int, ...], device: torch.device
) -> FBNetV2Supernet:
    """The space's supernet (seeded weights) with `resolutions`, in train mode on `device`."""
    builder, _, classes, *_ = SPACES[args.space]
    torch.manual_seed(0)
    net = builder(num_classes=classes, resolutions=resolutions).to(device).train()
    net.tau = FBNetV2Config.temperature  # the search's first-epoch temperature
    return net.to(memory_format=torch.channels_last) if args.channels_last else net


class SearchStep:
    """`FBNetV2Module.training_step`'s search step after the warm-up: a weights step on `weights`
    and an architecture step on `arch`, on two optimisers (see the module docstring)."""

    def __init__(
        self,
        net: FBNetV2Supernet,
        weights: tuple[Tensor, Tensor],
        arch: tuple[Tensor, Tensor],
        precision: str,
    ) -> None:
        self.net, self.batches = net.train(), (weights, arch)
        self.weights = torch.optim.SGD(net.weight_parameters(), **WEIGHTS_SGD)
        self.arch = torch.optim.Adam(net.arch_parameters(), **ARCH_ADAM)
        device = weights[0].device
        self.autocast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=precision == "bf16"
        )
        self.global_step = 0

    def ce_and_cost(self, stream: int) -> tuple[Tensor, Tensor]:
        """`FBNetV2Module._ce_and_cost`: CE on the stream's batch with Gumbel noise from
        (seed 0, step, stream), and the expected MACs of what that forward sampled."""
        x, y = self.batches[stream]
        with seeded(derived_seed(0, GUMBEL_STREAM, self.global_step, stream)):
            logits = self.net(x)
        ce = F.cross_entropy(logits, y)
        return ce, self.net.expected_macs().to(ce.dtype)

    @staticmethod
    def manual_step(optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
        """`DynlabModule.manual_step` without clipping and scheduler."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def __call__(self) -> None:
        with self.autocast:
            ce, _ = self.ce_and_cost(0)
        self.manual_step(self.weights, ce)
        with self.autocast:
            arch_ce, cost = self.ce_and_cost(1)
            loss = search_loss(arch_ce, cost, FBNetV2Config.alpha, FBNetV2Config.beta)
        self.manual_step(self.arch, loss)
        self.global_step += 1


class _Held:
    """A tensor saved for backward, reporting to `release` when autograd lets go of it."""

    __slots__ = ("key", "release", "tensor")

    def __init__(self, tensor: Tensor, key: int, release: Callable[[int], None]) -> None:
        self.tensor, self.key, self.release = tensor, key, release

    def __del__(self) -> None:
        self.release(self.key)


@contextlib.contextmanager
def saved_for_backward(exclude: Iterable[Tensor]) -> Iterator[dict[str, int]]:
    """Inside the block, the live bytes of the distinct storages autograd holds for backward
    (each counted once while any saved reference to it lives; storages of `exclude` not counted);
    `peak_bytes` of the returned dict is their maximum, `live_bytes` what is still held at exit."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    refs: dict[int, int] = {}
    sizes: dict[int, int] = {}
    out = {"peak_bytes": 0, "live_bytes": 0}

    def release(key: int) -> None:
        refs[key] -= 1
        if refs[key] == 0:
            del refs[key]
            out["live_bytes"] -= sizes.pop(key)

    def pack(t: Tensor) -> Tensor | _Held:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in skip:
            return t
        if key not in refs:
            refs[key], sizes[key] = 0, storage.nbytes()
            out["live_bytes"] += sizes[key]
            out["peak_bytes"] = max(out["peak_bytes"], out["live_bytes"])
        refs[key] += 1
        return _Held(t, key, release)

    def unpack(held: Tensor | _Held) -> Tensor:
        return held.tensor if isinstance(held, _Held) else held

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield out


def make_runs(
    args: argparse.Namespace, batches: list[tuple[Tensor, Tensor]]
) -> dict[str, Callable[[], tuple[Callable[[], None], torch.nn.Module]]]:
    """Builders of every run of RUNS: each returns the step and the net it trains."""
    (x, y), arch = batches
    full = args.resolutions
    largest = (max(full),)

    def standalone() -> tuple[Callable[[], None], torch.nn.Module]:
        supernet = build_supernet(args, full, x.device)
        torch.manual_seed(0)
        net = supernet.standalone(widest_choices(supernet)).to(x.device)
        if args.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return Stepper(net, x, y, args.precision), net

    def supernet(resolutions: tuple[int, ...]) -> tuple[Callable[[], None], torch.nn.Module]:
        net = build_supernet(args, resolutions, x.device)
        return Stepper(net, x, y, args.precision), net

    def search_step() -> tuple[Callable[[], None], torch.nn.Module]:
        net = build_supernet(args, full, x.device)
        return SearchStep(net, (x, y), arch, args.precision), net

    return {
        "standalone": standalone,
        "supernet": lambda: supernet(full),
        "supernet_one_resolution": lambda: supernet(largest),
        "search_step": search_step,
    }


def release_memory(device: torch.device) -> None:
    """Free what the last run left (cycles, the CUDA cache), so the next one starts alone."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_memory(
    builders: dict[str, Callable[[], tuple[Callable[[], None], torch.nn.Module]]],
    device: torch.device,
) -> dict[str, dict[str, float | None]]:
    """Per run, built alone: saved-for-backward peak (MiB) and peak GPU memory (GiB) of one step
    after a warm-up step (so the optimiser state exists, as in training)."""
    results = {}
    for name, build in builders.items():
        step, net = build()
        step()
        synchronize(device)
        with peak_memory(device) as peak, saved_for_backward(net.parameters()) as saved:
            step()
            synchronize(device)
        if saved["live_bytes"]:
            raise RuntimeError(f"{name}: {saved['live_bytes']} saved bytes outlived the step")
        results[name] = {"saved_mib": round(saved["peak_bytes"] / 2**20, 2)}
        results[name]["peak_gpu_gib"] = peak["gib"]
        del step, net
        release_memory(device)
    return results


def resolution_macs(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """MMACs per sample of the widest net at every resolution option, and their sum over the
    options (what the supernet's passes compute) against the largest option's."""
    net = build_supernet(args, args.resolutions, device)
    choices = widest_choices(net)
    per_option = {}
    for i, r in enumerate(net.resolutions):
        net.fix({**choices, "resolution": i})
        per_option[str(r)] = round(float(net.expected_macs()) / 1e6, 2)
    net.unfix()
    widest = per_option[str(max(net.resolutions))]
    return {
        "widest_mmacs_per_resolution": per_option,
        "supernet_passes_over_widest": round(sum(per_option.values()) / widest, 3),
        "params_m": {
            "supernet_weights": round(sum(p.numel() for p in net.weight_parameters()) / 1e6, 3),
            "supernet_logits": sum(p.numel() for p in net.arch_parameters()),
            "widest_standalone": round(
                sum(p.numel() for p in net.standalone(choices).parameters()) / 1e6, 3
            ),
        },
    }


def cost_and_adam_seconds(
    args: argparse.Namespace, batches: list[tuple[Tensor, Tensor]], device: torch.device
) -> float:
    """Best seconds of the architecture step's part outside the network: `expected_macs` of the
    last forward's weights, log(cost)^beta and its backward to the logits, the Adam step."""
    step = SearchStep(build_supernet(args, args.resolutions, device), *batches, args.precision)
    with step.autocast:
        step.net(batches[1][0])  # a forward, so that the weights of a sample exist

    def cost_and_adam() -> None:
        step.arch.zero_grad(set_to_none=True)
        cost = step.net.expected_macs()
        (FBNetV2Config.alpha * cost.log().pow(FBNetV2Config.beta)).backward(retain_graph=True)
        step.arch.step()

    return best_seconds({"cost_and_adam": cost_and_adam}, 20, args.repeats, device)["cost_and_adam"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_supernet_arguments(parser, SPACES, imagenet_batch=128, cpu_steps=2)
    parser.add_argument(
        "--resolutions", type=int, nargs="+", help="default: the space's (see the docstring)"
    )
    args = parser.parse_args()
    resolve_supernet_arguments(args, SPACES, cpu_steps=2)
    args.resolutions = tuple(args.resolutions or default_resolutions(args.space, args.image_size))
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    classes = SPACES[args.space][2]
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):  # the weights stream's batch and the architecture stream's
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
        y = torch.randint(0, classes, (args.batch_size,), generator=generator)
        x = x.to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append((x, y.to(device)))
    started = time.perf_counter()
    macs = resolution_macs(args, device)
    builders = make_runs(args, batches)
    memory = measure_memory(builders, device)
    runs = {name: build()[0] for name, build in builders.items()}
    seconds = best_seconds(runs, args.steps, args.repeats, device)
    del runs
    release_memory(device)
    cost_adam = cost_and_adam_seconds(args, batches, device)

    base = seconds["standalone"]
    time_ratios = {n: round(seconds[n] / base, 3) for n in RUNS[1:]}
    key = "peak_gpu_gib" if device.type == "cuda" else "saved_mib"
    memory_ratios = {
        f"{n}_{k}": round(memory[n][k] / memory["standalone"][k], 3)  # type: ignore[operator]
        for n in RUNS[1:]
        for k in ("saved_mib", "peak_gpu_gib")
        if memory["standalone"][k]
    }
    report = {
        "benchmark": "fbnetv2_supernet_step",
        "space": args.space,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "resolutions": list(args.resolutions),
        "precision": args.precision,
        "channels_last": args.channels_last,
        "torch_threads": torch.get_num_threads(),
        "steps_per_round": args.steps,
        "repeats": args.repeats,
        "target_ratio_at_most": TARGET,
        "step_s": {n: round(seconds[n], 5) for n in RUNS},
        "time_over_standalone": time_ratios,
        "memory": memory,
        "memory_over_standalone": memory_ratios,
        "memory_target_measure": key,
        "meets_target": {
            "time": time_ratios["supernet"] <= TARGET,
            "memory": memory["supernet"][key] / memory["standalone"][key] <= TARGET,  # type: ignore[operator]
        },
        "search_step_cost_and_adam_s": round(cost_adam, 6),
        **macs,
        "seconds": round(time.perf_counter() - started, 1),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
