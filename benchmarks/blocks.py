"""The talk's blocks on CPU: inference latency of each block's training form and deploy form
against the plain network of the same widths, at batch 1 and 64, next to parameters and MACs.

For ACNet and RepVGG the deploy form is a plain conv net: its time should match the plain net's
(target: deploy / plain time <= 1.1 at both batch sizes) while the training form costs more. For
WeightNet and FReLU nothing re-parameterises away: the report gives their time overhead over the
plain net next to their MACs overhead (a per-sample kernel batched as one grouped conv, and a
depthwise 3x3 per activation, cost more time than their MACs say on CPU). Rounds are interleaved
(`early_exit.best_seconds`). Prints one JSON object.
Run: `.venv/bin/python benchmarks/blocks.py [--backbone cifar_resnet20] [--threads N]`.
"""

from __future__ import annotations

import argparse
import json

import torch
from early_exit import best_seconds, inference
from torch import nn

from dynlab.backbones import create_backbone
from dynlab.evaluation.macs import count_macs
from dynlab.protocol import StaticExits

TARGET = 1.1  # re-parameterised deploy time / plain deploy time, at most
SIZE = (3, 32, 32)
# (name, conv, act): the plain net first, every other compared with it
VARIANTS = (
    ("plain", "plain", "relu"),
    ("acnet", "acnet", "relu"),
    ("repvgg", "repvgg", "relu"),
    ("weightnet", "weightnet", "relu"),
    ("frelu", "plain", "frelu"),
)
BATCHES = {1: 64, 64: 3}  # batch size -> number of batches timed per pass


def forms(backbone: str) -> dict[str, nn.Module]:
    """Training form (eval mode) and deploy form of every variant, random weights."""
    nets: dict[str, nn.Module] = {}
    for name, conv, act in VARIANTS:
        torch.manual_seed(0)
        net = StaticExits(create_backbone(backbone, num_classes=10, conv=conv, act=act)).eval()
        nets[f"{name}/train"] = net
        nets[f"{name}/deploy"] = net.deploy()
    return nets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="cifar_resnet20")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    nets = forms(args.backbone)
    macs = {k: count_macs(m, SIZE) for k, m in nets.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}

    report: dict[str, object] = {
        "backbone": args.backbone,
        "torch_threads": torch.get_num_threads(),
        "params": params,
        "macs": macs,
        "target_reparameterised_deploy_over_plain": TARGET,
    }
    x = torch.randn(max(b * n for b, n in BATCHES.items()), *SIZE)
    for batch, count in BATCHES.items():
        batches = list(x[: batch * count].split(batch))
        seconds = best_seconds({k: inference(m) for k, m in nets.items()}, batches, args.repeats)
        plain = seconds["plain/deploy"]
        per_variant = {}
        for name, _, _ in VARIANTS[1:]:
            train, deploy = seconds[f"{name}/train"], seconds[f"{name}/deploy"]
            per_variant[name] = {
                "train_over_plain_time": round(train / plain, 3),
                "deploy_over_plain_time": round(deploy / plain, 3),
                "deploy_over_plain_macs": round(macs[f"{name}/deploy"] / macs["plain/deploy"], 3),
                "train_over_deploy_time": round(train / deploy, 3),
            }
        report[f"batch_{batch}"] = {
            "ms_per_image": {k: round(1e3 * s / (batch * count), 4) for k, s in seconds.items()},
            "vs_plain": per_variant,
            "target_met": all(
                per_variant[n]["deploy_over_plain_time"] <= TARGET for n in ("acnet", "repvgg")
            ),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
