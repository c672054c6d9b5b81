"""Where ONNX Runtime spends a deploy form's time: ONNX Runtime's own profiler over a few batches,
summed by operator type (share of the node time). Explains a missed speed target, e.g. the
condensed CondenseNetV2 against the masked one. Prints one JSON object.
Run: `.venv/bin/python benchmarks/onnx_profile.py [--model cifar_condensenetv2_110] [--batch 64]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import onnxruntime as ort
import torch
from sfr_convert import SIZES, models

from dynlab.evaluation.export import export_onnx
from dynlab.protocol import StaticExits


def profile(directory: str, batch: int, size: tuple[int, int, int], runs: int) -> dict[str, float]:
    """Share of node time by operator type over `runs` batches (after one warm-up run)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(directory) / "profile")
    session = ort.InferenceSession(str(Path(directory) / "stage0.onnx"), options)
    x = torch.randn(batch, *size).numpy()
    for _ in range(runs + 1):
        session.run(None, {"image": x})
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op: Counter[str] = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    total = sum(by_op.values())
    return {op: round(t / total, 3) for op, t in by_op.most_common(8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SIZES), default="cifar_condensenetv2_110")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = SIZES[args.model]
    report: dict[str, object] = {"model": args.model, "batch": args.batch}
    for name, net in models(args.model).items():
        if name == "dense":
            continue
        deployed = net if net.deployed else StaticExits(net.net).eval().deploy()
        with tempfile.TemporaryDirectory() as directory:
            export_onnx(deployed, size, directory)
            report[name] = profile(directory, args.batch, size, args.runs)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
