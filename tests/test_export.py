"""ONNX export of every technique's deploy form: one graph per exit with a dynamic batch, parity
with PyTorch at every exit on another batch size than the traced one, early exit in ONNX Runtime
that stops computing, per-sample export of WeightNet, one-line failures; measured latency."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from dynlab.errors import ConfigError, ExportError
from dynlab.evaluation.early_exit import early_exit_predict
from dynlab.evaluation.export import OnnxExits, export_onnx
from dynlab.evaluation.latency import measure_budgets, measure_exits
from dynlab.evaluation.manifest import read_manifest
from dynlab.protocol import DynamicNet, StaticExits
from dynlab.techniques.sfr.module import sparse_layers
from dynlab.validation import build_run, check_config

from .conftest import TINY, run_cli

SIZE = (3, 32, 32)
S2D = ["technique=s2dnas", "technique.num_stages=3", "technique.groups=4"]
TECHNIQUES = {
    "baseline": [],
    "weightnet": ["+backbone.kwargs.conv=weightnet"],
    "s2dnas": S2D,
    "acnet_frelu": ["+backbone.kwargs.conv=acnet", "+backbone.kwargs.act=frelu"],
    "repvgg": ["+backbone.kwargs.conv=repvgg"],
    "s2dnas_all": [*S2D, "technique.exit_features=all"],
    "gfnet": [
        "technique=gfnet",
        "technique.patch_size=16",
        "technique.T=3",
        "technique.classifier_hidden=32",
        "technique.policy_hidden=32",
        "technique.policy_width=64",
    ],
    "sfr": ["technique=sfr", "backbone=cifar_condensenetv2_tiny", "trainer.max_epochs=6"],
    "spos": ["technique=spos", "backbone=cifar_spos_supernet_tiny"],
    "fbnetv2": [
        "technique=fbnetv2",
        "backbone=cifar_fbnetv2_supernet_tiny",
        "technique.warmup_epochs=1",
        "technique.phases.search.epochs=2",
    ],
}
FAST = ("baseline", "weightnet", "s2dnas")  # the rest in the full tier (seconds each)


def deployed(compose_cfg, overrides: list[str]) -> DynamicNet:
    """A technique's deploy form, its BatchNorms given running statistics of a batch (fresh ones
    fold to identities) and, for SFR, every drop of its schedule made."""
    torch.manual_seed(0)
    _, module = build_run(compose_cfg([*TINY, *overrides]))
    model = module.model.train()
    with torch.no_grad():
        model.forward_exits(torch.randn(16, *SIZE))
    for _, layer in sparse_layers(model):
        for _ in range(layer.stages):
            layer.drop()
    return model.eval().deploy()


def images(n: int, seed: int = 1) -> Tensor:
    return torch.randn(n, *SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "technique",
    [t if t in FAST else pytest.param(t, marks=pytest.mark.slow) for t in TECHNIQUES],
)
def test_every_deploy_form_exports_with_parity_at_every_exit(compose_cfg, tmp_path, technique):
    net = deployed(compose_cfg, TECHNIQUES[technique])
    manifest = export_onnx(net, SIZE, tmp_path, images=images(5))
    exits = net.forward_exits(images(5))
    assert manifest["stages"] == [f"stage{k}.onnx" for k in range(len(exits))]
    assert manifest["exit_macs"] == net.exit_macs(SIZE)
    parity = manifest["parity"]
    assert parity["images"] == 5 and len(parity["max_abs_diff"]) == len(exits)
    assert all(
        d <= 1e-4 * s for d, s in zip(parity["max_abs_diff"], parity["logit_scale"], strict=True)
    )
    # WeightNet folds the batch into its convs' groups: exported at batch 1, run per sample.
    assert bool(manifest["per_sample"]) == (technique == "weightnet")
    assert read_manifest(tmp_path) == manifest
    # The export in ONNX Runtime gives the same exits on yet another batch size.
    export = OnnxExits(tmp_path)
    for a, e in zip(
        export.forward_exits(images(7, seed=2)), net.forward_exits(images(7, seed=2)), strict=True
    ):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max().clamp(min=1)))


def test_early_exit_in_onnx_runtime_stops_computing_and_matches_pytorch(compose_cfg, tmp_path):
    net = deployed(compose_cfg, S2D)
    export_onnx(net, SIZE, tmp_path)
    export = OnnxExits(tmp_path)
    x = images(32)
    # thresholds that let about a third of the samples leave at each exit
    confidence = [p.softmax(1).amax(1) for p in net.forward_exits(x)]
    thresholds = [float(confidence[0].quantile(0.67)), float(confidence[1].quantile(0.5)), 0.0]
    seen: list[int] = []
    run_stage = export.run_stage
    export.run_stage = lambda k, image, *c: seen.append(len(image)) or run_stage(k, image, *c)
    logits, exits = early_exit_predict(export, x, thresholds)
    expected_logits, expected_exits = early_exit_predict(net, x, thresholds)
    assert torch.equal(exits, expected_exits) and len(set(exits.tolist())) == 3
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    # each graph ran only on the samples still in: 32, then those left after each exit
    assert seen == [32, int((exits >= 1).sum()), int((exits >= 2).sum())]


class Noisy(DynamicNet):
    """A net whose output draws noise: its export cannot match it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 4)

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        logits = self.fc(x.flatten(1))
        return [logits + torch.rand_like(logits)]

    def exit_macs(self, input_size: tuple[int, int, int]) -> list[float]:
        return [48.0]


class DataDependent(Noisy):
    """A net whose control flow depends on the data: torch.export cannot trace it."""

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return [self.fc(x.flatten(1)) * (2 if float(x.sum()) > 0 else 1)]


class FixedBatch(Noisy):
    """A net that builds a tensor of the traced batch size: its graph has that batch baked in."""

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return [self.fc(x.flatten(1)) + torch.zeros(len(x), 4)]


class TwoExits(Noisy):
    """Two exits and no stages of its own."""

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return [self.fc(x.flatten(1))] * 2


@pytest.mark.parametrize(
    ("net", "message"),
    [
        (Noisy(), "parity: exit 1 of the ONNX export differs from the PyTorch deploy form by"),
        (DataDependent(), "stage 0 (LastExit) does not export: "),
        (FixedBatch(), "parity: the export does not run on a batch of 3 ("),
        (TwoExits(), "TwoExits has 2 exits but 1 export stages"),
        (StaticExits(nn.Flatten()), "StaticExits is not a deploy form"),
    ],
)
def test_export_failures_are_one_line(tmp_path, net, message):
    net = net if isinstance(net, StaticExits) else net.eval().deploy()
    with pytest.raises(ExportError) as err:
        export_onnx(net, (3, 2, 2), tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_latency_per_exit_grows_with_the_exits_and_budgets_between(compose_cfg, tmp_path):
    net = deployed(compose_cfg, S2D)
    export_onnx(net, SIZE, tmp_path)
    runtimes = {"torch": net, "onnxruntime": OnnxExits(tmp_path, threads=1)}
    x = images(16)
    with torch.random.fork_rng():
        record = measure_exits(runtimes, x, [1, 8], warmup=1, repeats=3)
    for batch in ("batch_1", "batch_8"):
        for name in runtimes:
            ms = [e["ms_per_image"] for e in record[batch][name]]
            assert len(ms) == 3 and 0 < ms[0] < ms[2]  # exit 3 runs all three stages
        assert set(record[batch]["noise_floor"]) == {"a_a_ratio", "resolves"}
    inf = float("inf")
    curve = [
        {"q": "first", "thresholds": [0.0, 0.0, 0.0]},
        {"q": "last", "thresholds": ["inf", inf, 0.0]},
    ]
    first, last = measure_budgets(runtimes, x, curve, 8, warmup=1, repeats=3)
    for name in runtimes:  # everyone leaving at exit 1 is faster than everyone running to exit 3
        assert first[name]["ms_per_image"] < last[name]["ms_per_image"]


def test_latency_settings_are_checked_before_a_run(compose_cfg):
    with pytest.raises(ConfigError, match=r"evaluation.latency.images=8: a timed pass needs"):
        check_config(compose_cfg([*TINY, "evaluation.latency.images=8"]))


@pytest.mark.slow
def test_a_run_records_latency_and_its_export_reproduces_its_accuracy(tmp_path):
    args = [
        *TINY,
        *S2D,
        "evaluation.latency.images=64",
        "evaluation.latency.repeats=2",
        "evaluation.latency.budget_batch=32",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    run_cli("train", args, tmp_path, env={"DYNLAB_LATENCY": "true"})
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    latency = results["latency"]
    assert latency["export"]["dir"] == "export" and latency["machine"]["cpu"]
    assert set(latency["exits"]) == {"batch_1", "batch_64"}
    assert {"torch", "onnxruntime", "noise_floor"} == set(latency["exits"]["batch_64"])
    assert [r["q"] for r in latency["budgeted"]] == [c["q"] for c in results["budgeted"]["curve"]]
    manifest = read_manifest(tmp_path / "run" / "export")
    assert list(manifest["thresholds"]) == [str(c["q"]) for c in results["budgeted"]["curve"]]

    run_cli(
        "evaluate",
        [f"export_dir={tmp_path / 'run' / 'export'}", f"hydra.run.dir={tmp_path / 'onnx'}"],
        tmp_path,
    )
    onnx = json.loads((tmp_path / "onnx" / "results.json").read_text())
    assert [r["top1"] for r in onnx["anytime"]] == [r["top1"] for r in results["anytime"]]
    assert [c["accuracy"] for c in onnx["budgeted"]["curve"]] == [
        c["accuracy"] for c in results["budgeted"]["curve"]
    ]
    assert onnx["runtime"] == "onnxruntime"

    ckpt = tmp_path / "run" / "checkpoints" / "train" / "final.ckpt"
    proc = run_cli("export", [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'exp'}"], tmp_path)
    assert "3 ONNX graph(s)" in proc.stdout
    assert read_manifest(tmp_path / "exp" / "export")["technique"] == "s2dnas"
