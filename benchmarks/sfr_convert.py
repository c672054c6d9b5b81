"""CondenseNetV2 on CPU: the condensed (converted) network against the masked one it comes from and
a dense network of the same widths: batch-1 latency and batch-64 throughput, next to the MACs.

The masked network has made every drop of its schedule (random weights: the cost does not depend
on which connections survive); its deploy form replaces each LGC/SFR by index + group conv
(`dynlab.nn.condense`). Target: measured speed-up of condensed over masked >= 0.7 x their MACs
ratio. Each network also runs exported to ONNX Runtime (`onnx_*`, parity with PyTorch recorded).
Rounds are interleaved (`early_exit.best_seconds`), so machine load hits all of them alike.
Prints one JSON object. Run: `.venv/bin/python benchmarks/sfr_convert.py [--model NAME]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile

import torch
from early_exit import best_seconds, inference
from torch import nn

from dynlab.backbones import create_backbone
from dynlab.evaluation.export import OnnxExits, export_onnx
from dynlab.evaluation.macs import count_macs
from dynlab.protocol import StaticExits
from dynlab.techniques.sfr.module import SparseNet, sparse_layers

TARGET = 0.7
SIZES = {"cifar_condensenetv2_110": (3, 32, 32), "condensenetv2_a": (3, 224, 224)}
NUM_CLASSES = {"cifar_condensenetv2_110": 10, "condensenetv2_a": 1000}


def models(name: str) -> dict[str, nn.Module]:
    """Dense (masks never applied: every mask is ones), masked (every drop made) and condensed."""
    torch.manual_seed(0)
    dense = SparseNet(create_backbone(name, num_classes=NUM_CLASSES[name])).eval()
    masked = copy.deepcopy(dense)
    for _, layer in sparse_layers(masked.net):
        for _ in range(layer.stages):
            layer.drop()
    return {"dense": dense, "masked": masked, "condensed": masked.deploy()}


def onnx_forms(
    nets: dict[str, nn.Module], size: tuple[int, int, int], root: str
) -> tuple[dict, dict]:
    """Each network's deploy form exported (dense and masked with BN folded, as they are; the
    condensed one as converted) and run in ONNX Runtime; their parity per network."""
    forms, parity = {}, {}
    for name, net in nets.items():
        deployed = net if net.deployed else StaticExits(net.net).eval().deploy()
        manifest = export_onnx(deployed, size, f"{root}/{name}", images=torch.randn(3, *size))
        forms[f"onnx_{name}"] = OnnxExits(f"{root}/{name}", threads=torch.get_num_threads())
        parity[name] = manifest["parity"]["max_abs_diff"][0]
    return forms, parity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SIZES), default="cifar_condensenetv2_110")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = SIZES[args.model]
    nets = models(args.model)
    macs = {k: count_macs(m, size) for k, m in nets.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}
    x = torch.randn(64, *size)
    with torch.no_grad():
        agree = float((nets["masked"](x[:8]) - nets["condensed"](x[:8])).abs().max())

    report: dict[str, object] = {
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "macs": macs,
        "params": params,
        "max_abs_difference_masked_vs_condensed": agree,
        "target_measured_over_macs": TARGET,
    }
    export_dir = tempfile.TemporaryDirectory()
    forms, report["onnx_parity_max_abs_diff"] = onnx_forms(nets, size, export_dir.name)
    nets |= forms
    for batch, count in ((1, 32), (64, 2)):
        batches = list(x[: batch * count].split(batch)) if batch > 1 else list(x[:count, None])
        seconds = best_seconds({k: inference(m) for k, m in nets.items()}, batches, args.repeats)
        macs_ratio = macs["masked"] / macs["condensed"]
        report[f"batch_{batch}"] = {
            "ms_per_image": {k: round(1e3 * s / (batch * count), 3) for k, s in seconds.items()},
            "images_per_s": {k: round(batch * count / s, 1) for k, s in seconds.items()},
            "macs_ratio": round(macs_ratio, 3),
        }
        for prefix in ("", "onnx_"):
            measured = seconds[f"{prefix}masked"] / seconds[f"{prefix}condensed"]
            report[f"batch_{batch}"]["onnxruntime" if prefix else "eager"] = {
                "condensed_over_masked_speedup": round(measured, 3),
                "measured_over_macs": round(measured / macs_ratio, 3),
                "meets_target": measured / macs_ratio >= TARGET,
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
