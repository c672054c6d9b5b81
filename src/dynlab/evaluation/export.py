"""The deploy form exported to ONNX, one graph per exit, and run in ONNX Runtime.

Each exit's stage (`DynamicNet.export_stages`, see dynlab.protocol) becomes its own graph with a
dynamic batch: `stage<k>.onnx` takes `image` and the tensors the earlier stage carried, and gives
`logits` and what it carries on. The exit decision stays between graphs, so early exit in ONNX
Runtime really stops computing (`OnnxExits.exit_session`). A network with a block that folds the
batch into its channels (WeightNet's grouped conv, `export_per_sample = True` on the block class)
is exported at batch 1 and run one sample at a time. Every export is checked against the PyTorch
deploy form at every exit on a batch of another size than the one traced (`parity`), and a
`manifest.json` records exits, MACs, parameters, input size and the budgeted thresholds.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dynlab.errors import ExportError
from dynlab.evaluation.manifest import FORMAT, read_manifest, write_manifest
from dynlab.protocol import StagedSession

OPSET = 18
TRACE_BATCH, PARITY_BATCH = 2, 3  # parity on another batch size than the traced one


def per_sample_blocks(net: nn.Module) -> list[str]:
    """Names of the blocks that fold the batch into one op (`export_per_sample` on their class)."""
    return [name for name, m in net.named_modules() if getattr(m, "export_per_sample", False)]


def export_onnx(
    net: nn.Module,
    input_size: tuple[int, int, int],
    directory: str | Path,
    *,
    images: Tensor | None = None,
    tolerance: float = 1e-4,
    manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export the deploy form `net` as one ONNX graph per exit into `directory`, check it against
    `net` on `images` (random ones when None) and write the manifest (`manifest` adds entries).
    Raises ExportError in one line when an op cannot be exported or an exit differs by more than
    `tolerance` (max abs difference of the logits)."""
    if not getattr(net, "deployed", False):
        raise ExportError(f"{type(net).__name__} is not a deploy form: export net.deploy()")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    per_sample = per_sample_blocks(net)
    net = net.cpu().eval()
    stages = [stage.eval() for stage in net.export_stages()]  # type: ignore[operator]
    generator = torch.Generator().manual_seed(0)
    trace = torch.randn(1 if per_sample else TRACE_BATCH, *input_size, generator=generator)
    with torch.no_grad():
        num_exits = len(net.forward_exits(trace))  # type: ignore[operator]
    if len(stages) != num_exits:
        raise ExportError(
            f"{type(net).__name__} has {num_exits} exits but {len(stages)} export stages: it "
            "needs its own export_stages (dynlab.protocol.ExitStage)"
        )
    files, carried = [], ()
    for k, stage in enumerate(stages):
        path = directory / f"stage{k}.onnx"
        with torch.no_grad():
            outputs = stage(trace, *carried)
        _export_stage(stage, (trace, *carried), len(outputs) - 1, path, dynamic=not per_sample, k=k)
        files.append(path.name)
        carried = tuple(outputs[1:])
    record = {
        "format": FORMAT,
        "stages": files,
        "per_sample": per_sample,
        "input_size": list(input_size),
        "exit_macs": [float(m) for m in net.exit_macs(input_size)],  # type: ignore[operator]
        "params": sum(p.numel() for p in net.parameters()),
        "opset": OPSET,
        "exporter": f"torch {torch.__version__} (torch.export)",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **(manifest or {}),
    }
    if images is None:
        images = torch.randn(PARITY_BATCH, *input_size, generator=generator)
    record["parity"] = check_parity(net, OnnxExits(directory, manifest=record), images, tolerance)
    write_manifest(directory, record)  # only an export that matches its PyTorch form has one
    return record


def _export_stage(
    stage: nn.Module, args: tuple[Tensor, ...], carried_out: int, path: Path, dynamic: bool, k: int
) -> None:
    """One stage through torch's exporter (torch.export, then ONNX); one line when it fails."""
    inputs = ["image", *(f"carried_{i}" for i in range(len(args) - 1))]
    outputs = ["logits", *(f"next_{i}" for i in range(carried_out))]
    shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1)
        carried = (tuple({0: batch} for _ in args[1:]),) if len(args) > 1 else ()
        shapes = ({0: batch}, *carried)  # forward(image, *carried)
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            torch.onnx.export(
                stage,
                args,
                str(path),
                input_names=inputs,
                output_names=outputs,
                dynamo=True,
                opset_version=OPSET,
                dynamic_shapes=shapes,
                external_data=False,
                verbose=False,
            )
    except Exception as err:  # the exporter raises many types; its root cause names the op
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        text = str(cause).replace("\x1b", "")
        reason = next((line for line in text.splitlines() if line.strip()), type(cause).__name__)
        raise ExportError(f"stage {k} ({type(stage).__name__}) does not export: {reason}") from err


def check_parity(
    net: nn.Module, export: OnnxExits, images: Tensor, tolerance: float
) -> dict[str, Any]:
    """Max abs difference of every exit's logits, export vs PyTorch deploy form, on `images`,
    judged against `tolerance` times the logits' scale (their max abs value, at least 1: float32
    summation order moves large logits by more); raises ExportError naming the worst exit."""
    with torch.no_grad():
        expected = net.forward_exits(images.cpu())  # type: ignore[operator]
        try:
            actual = export.forward_exits(images.cpu())
        except Exception as err:  # ONNX Runtime's own error types; the first line says enough
            reason = next((line for line in str(err).splitlines() if line.strip()), "")
            raise ExportError(
                f"parity: the export does not run on a batch of {len(images)} ({reason.strip()})"
            ) from err
    diffs = [float((a - e).abs().max()) for a, e in zip(actual, expected, strict=True)]
    scales = [max(1.0, float(e.abs().max())) for e in expected]
    ratio = [d / s for d, s in zip(diffs, scales, strict=True)]
    worst = max(range(len(diffs)), key=ratio.__getitem__)
    if not ratio[worst] <= tolerance:
        raise ExportError(
            f"parity: exit {worst + 1} of the ONNX export differs from the PyTorch deploy form by "
            f"{diffs[worst]:.3g} (max abs logit difference, logits up to {scales[worst]:.3g}; "
            f"tolerance {tolerance:g} of that)"
        )
    return {
        "max_abs_diff": diffs,
        "logit_scale": scales,
        "tolerance": tolerance,
        "images": len(images),
    }


class OnnxExits(nn.Module):
    """An export run in ONNX Runtime on CPU, answering the inference side of the dynamic-model
    protocol on torch tensors (`forward_exits`, `exit_session`, `exit_macs`), so that the
    evaluations and early exit run on it as on the PyTorch deploy form."""

    deployed = True

    def __init__(
        self,
        directory: str | Path,
        threads: int | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> None:
        """The export in `directory`, described by its manifest.json (or by `manifest`, for the
        exporter's own parity check before it writes one)."""
        super().__init__()
        import onnxruntime as ort

        self.directory = Path(directory)
        self.manifest = manifest if manifest is not None else read_manifest(directory)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # No spinning threads: runtimes timed in turns (dynlab.evaluation.latency) would otherwise
        # find ONNX Runtime's pool still spinning on the cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = [
            ort.InferenceSession(
                str(self.directory / name), options, providers=["CPUExecutionProvider"]
            )
            for name in self.manifest["stages"]
        ]
        self.per_sample = bool(self.manifest["per_sample"])
        self.eval()

    @property
    def num_exits(self) -> int:
        return len(self.sessions)

    def run_stage(self, k: int, image: Tensor, *carried: Tensor) -> list[Tensor]:
        """Stage k's graph on CPU tensors: (logits, *carried_next)."""
        if self.per_sample and len(image) > 1:
            rows = [
                self.run_stage(k, image[i : i + 1], *(c[i : i + 1] for c in carried))
                for i in range(len(image))
            ]
            return [torch.cat(parts) for parts in zip(*rows, strict=True)]
        session = self.sessions[k]
        feeds = {
            i.name: t.detach().contiguous().numpy()
            for i, t in zip(session.get_inputs(), (image, *carried), strict=True)
        }
        return [torch.from_numpy(out) for out in session.run(None, feeds)]

    def exit_session(self, x: Tensor) -> StagedSession:
        return StagedSession([partial(self.run_stage, k) for k in range(self.num_exits)], x.cpu())

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        session = self.exit_session(x)
        return [session.next_exit() for _ in range(self.num_exits)]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_exits(x)[-1]

    def exit_macs(self, input_size: Sequence[int] | None = None) -> list[float]:
        return list(self.manifest["exit_macs"])
