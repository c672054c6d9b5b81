"""FBNetV2 on latency (techniques/fbnetv2/latency.py, `technique.cost=latency`): the table holds
each op of the space at the shape a child meets it, its expected latency is the exact expectation
over the space and differentiable in every choice, its span the space's true extremes, tables are
calibrated on whole networks, and the search runs on it (FBNet's loss or a target in ms). How well
the tables predict whole networks is measured in benchmarks/latency_table.py, not here."""

from __future__ import annotations

import itertools
import json
import re
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynlab.backbones import create_backbone
from dynlab.backbones.fbnetv2 import CHOICE_KEYS
from dynlab.runner import run_job
from dynlab.search import RESULT, latency_table
from dynlab.search.latency_table import REFERENCES, TimingConfig
from dynlab.techniques.fbnetv2.latency import FBNetV2Latency
from dynlab.validation import ConfigError, build_run, validate_config

from .conftest import compose_in
from .test_fbnetv2 import FBNET

QUICK = TimingConfig(threads=1, warmup=1, rounds=3, calls=1)
SIZE = (3, 32, 32)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DYNLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny(cache: Path) -> tuple[Any, FBNetV2Latency]:
    torch.manual_seed(0)
    net = create_backbone("cifar_fbnetv2_supernet_tiny", num_classes=10)
    return net, FBNetV2Latency.build(net, SIZE, QUICK)


def _every_architecture(net: Any) -> list[dict[str, Any]]:
    counts = net._option_counts()
    groups = [(k, i, n) for k in CHOICE_KEYS for i, n in enumerate(counts[k])]
    out = []
    for picks in itertools.product(*(range(n) for _, _, n in groups)):
        choices: dict[str, Any] = {k: [] for k in CHOICE_KEYS}
        for (key, _, _), p in zip(groups, picks, strict=True):
            choices[key].append(p)
        out.append({**choices, "resolution": choices["resolution"][0]})
    return out


def _one_hot(net: Any, choices: dict[str, Any]) -> dict[str, Any]:
    counts = net._option_counts()
    hot = lambda i, n: F.one_hot(torch.tensor(i), n).double()  # noqa: E731
    return {"resolution": hot(choices["resolution"], counts["resolution"][0])} | {
        k: [hot(i, n) for i, n in zip(choices[k], counts[k], strict=True)] for k in CHOICE_KEYS[1:]
    }


def test_each_child_op_is_keyed_by_the_shape_the_child_meets_it(tiny) -> None:
    """For a few architectures: the keys of the child's ops name the input and output shapes that
    the standalone child's layers see (hooks on a forward), one pw/dw/pwl per block, SE where
    chosen; every table entry is some op of the space."""
    net, latency = tiny
    rng = np.random.default_rng(0)
    counts = net._option_counts()
    used: set[str] = set()
    for choices in _every_architecture(net):
        used |= set(latency.op_keys(choices))
    assert used == set(latency.table.entries)
    for _ in range(4):
        choices = {k: [int(rng.integers(n)) for n in counts[k]] for k in CHOICE_KEYS}
        choices["resolution"] = choices["resolution"][0]
        child = net.standalone(choices).eval()
        seen: list[str] = []

        def hook(module, args, out, kind: str, seen: list[str] = seen) -> None:
            (c, h, w), (co, ho, wo) = args[0].shape[1:], out.shape[1:]
            seen.append(f"{kind}-input:{h}x{w}x{c}-output:{ho}x{wo}x{co}")

        first = 1 if net.first is not None else 0
        for block, spec in list(zip(child.blocks, child.specs, strict=True))[first:]:
            if spec.op == "skip":  # its projection, none when the shape stays
                if block.proj is not None:
                    block.proj.register_forward_hook(lambda m, a, o: hook(m, a, o, "skip"))
                continue
            for kind in ("pw", "dw", "se", "pwl"):
                part = getattr(block, kind)
                if part is not None:
                    part.register_forward_hook(lambda m, a, o, kind=kind: hook(m, a, o, kind))
            if spec.residual:  # the add, on the block's output
                block.register_forward_hook(lambda m, a, o: hook(m, (o,), o, "add"))
        with torch.no_grad():
            child(torch.randn(1, *SIZE))
        blocks = latency.op_keys(choices)[2:]  # after the stem and the head
        assert sorted(map(_kind_and_shapes, blocks)) == sorted(map(_kind_and_shapes, seen))


def _kind_and_shapes(key: str) -> tuple[str, str, str]:
    """(kind: pw, dw, se, pwl, add, skip; input HxWxC, output HxWxC) of a key or a seen layer."""
    kind, shapes = key.split("-input:")
    given, out = shapes.split("-output:")
    return re.match(r"[a-z]+", kind).group(0), given, out


def test_the_expected_latency_is_exact_and_differentiable_and_the_span_is_the_extremes(
    tiny,
) -> None:
    """Over every architecture of the tiny space: at one-hot weights `expected` is `ms`; at the
    softmax of random logits it is the probability-weighted mean of `ms`; `span` is the min and
    max of `ms`; every logit group gets a gradient."""
    net, latency = tiny
    archs = _every_architecture(net)
    ms = np.array([latency.ms(c) for c in archs])
    for c in archs[:: len(archs) // 7]:
        assert float(latency.expected(_one_hot(net, c))) == pytest.approx(latency.ms(c), rel=1e-12)
    assert latency.span() == pytest.approx((ms.min(), ms.max()), rel=1e-12)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.normal_()
    # in float64, where each group's probabilities sum to 1 within 1e-16
    weights = {"resolution": net.alpha_resolution.double().softmax(-1)} | {
        k: [t.double().softmax(-1) for t in net._alphas(k)] for k in CHOICE_KEYS[1:]
    }
    expected = latency.expected(weights)
    probs = np.ones(len(archs))
    for a, c in enumerate(archs):
        probs[a] *= float(weights["resolution"][c["resolution"]].detach())
        for k in CHOICE_KEYS[1:]:
            for g, i in zip(weights[k], c[k], strict=True):
                probs[a] *= float(g[i].detach())
    assert float(expected) == pytest.approx(float(probs @ ms), rel=1e-9)
    expected.backward()
    # every group with a choice (one-option groups, such as a stride-2 block's op, have none)
    assert all(float(p.grad.abs().max()) > 0 for p in net.arch_parameters() if p.numel() > 1)


def test_a_table_is_calibrated_on_whole_reference_networks(tiny, cache: Path) -> None:
    """The scale is the median of measured / summed over the reference networks, it multiplies
    every prediction, and it is cached with the table."""
    net, latency = tiny
    calibration = latency.table.calibration
    pairs = calibration["references"]
    assert len(pairs) == REFERENCES and all(s > 0 and m > 0 for s, m in pairs)
    assert calibration["scale"] == statistics.median(m / s for s, m in pairs)
    choices = _every_architecture(net)[5]
    summed = latency.table.ops_ms(latency.op_keys(choices))
    assert latency.ms(choices) == pytest.approx(summed * calibration["scale"])
    (path,) = cache.rglob("fbnetv2-*.json")
    assert json.loads(path.read_text())["calibration"] == calibration
    again = FBNetV2Latency.build(net, SIZE, QUICK)
    assert again.table.calibration == calibration and again.ms(choices) == latency.ms(choices)


@pytest.mark.slow
def test_a_search_on_latency_reports_the_predicted_ms_of_what_it_found(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`technique.cost=latency`: the search's cost is the table's expected ms (logged, and the
    search result holds the argmax network's predicted ms and the softmax's expected ms)."""
    run = tmp_path / "run"
    run_job(compose_in([*FBNET, "technique.cost=latency", "technique.beta=3"], "search", run))
    result = json.loads((run / "checkpoints" / "search" / RESULT).read_text())
    assert result["cost"] == "latency" and result["target_ms"] is None
    torch.manual_seed(0)
    net = create_backbone("cifar_fbnetv2_supernet_tiny", num_classes=10)
    (path,) = cache.rglob("fbnetv2-*.json")  # the run's table, read back: nothing timed anew
    monkeypatch.setattr(latency_table, "time_ops", lambda *_: pytest.fail("timed again"))
    latency = FBNetV2Latency.build(net, SIZE, TimingConfig())
    assert result["predicted_ms"] == pytest.approx(latency.ms(result["architecture"]))
    fastest, slowest = latency.span()
    assert fastest <= result["predicted_ms"] <= slowest
    assert fastest <= result["expected_ms"] <= slowest
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2, 3]


@pytest.mark.parametrize("place", [0.1, 0.9])
def test_the_architecture_loss_takes_the_latency_and_a_target_in_ms(
    compose_cfg, cache: Path, place: float
) -> None:
    """FBNet's loss on the expected ms relative to the fastest architecture's; with target_ms
    (near the fastest or the slowest), a few Adam steps move the softmax's expected ms at least
    half-way to the target."""
    _, module = build_run(compose_cfg([*FBNET, "technique.cost=latency"]))
    latency = module._latency
    assert module.cost_reference == latency.span()[0]
    net = module._supernet.train()
    torch.manual_seed(0)
    x, y = torch.randn(8, *SIZE), torch.randint(0, 10, (8,))
    net(x)
    assert float(module.cost_of()) == float(latency.expected(net.last_weights()))
    fastest, slowest = latency.span()
    target = fastest + place * (slowest - fastest)
    _, module = build_run(
        compose_cfg([*FBNET, "technique.cost=latency", f"technique.target_ms={target}"])
    )
    net = module._supernet.train()
    net.tau = 5.0
    optimizer = torch.optim.Adam(net.arch_parameters(), lr=0.05)

    def expected() -> float:
        with torch.no_grad():
            return float(module._latency.expected(net.softmax_weights()))

    start = expected()
    for _ in range(20):
        ce = F.cross_entropy(net(x), y)
        loss = module.arch_loss(ce, module.cost_of().float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert abs(expected() - target) < 0.5 * abs(start - target)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("technique.target_ms=1", "target_ms needs cost=latency"),
        ("technique.cost=latency technique.target_ms=-1", "target_ms=-1.0 must be a number of ms"),
        ("technique.cost=latency technique.target_ms=1000", "lies outside the space, whose"),
        ("technique.cost=latency technique.latency_threads=0", "latency_threads must be >= 1"),
    ],
)
def test_a_bad_latency_setting_is_refused_before_anything_runs(
    compose_cfg, cache: Path, override: str, message: str
) -> None:
    cfg = compose_cfg([*FBNET, *override.split()], config_name="search")
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)
        build_run(cfg)


def test_skip_activation_stem_and_head_choices_are_exact_in_the_table() -> None:
    """A space with every kind of choice (stem and head widths, skip, activations, equal-width
    rules) and an untimed table of random entries: every entry is an op of some architecture,
    `expected` is `ms` at one-hot weights and the softmax-weighted mean of `ms`, and `span` is
    the min and max of `ms` over every architecture."""
    from dynlab.backbones.fbnetv2 import FBNetV2Supernet
    from dynlab.search.latency_table import LatencyTable
    from dynlab.techniques.fbnetv2.latency import _ops

    space = {"space": "cifar", "stage_widths": [[8, 16], [8, 16]], "strides": [1, 1]}
    space |= {"repeats": [1, 1], "expansions": [1, 2], "acts": [["relu", "hswish"], "relu"]}
    space |= {"skip": True, "stem_width": [8, 16], "first_width": 0, "head_width": [24, 32]}
    net = FBNetV2Supernet(**space, resolutions=[16, 8], num_classes=3)
    ops, keys, options = _ops(net, (3, 16, 16))
    rng = np.random.default_rng(0)
    latency = FBNetV2Latency(
        LatencyTable({k: {"mean": float(rng.uniform(0.1, 1.0))} for k in ops}), keys, options
    )
    archs = _every_architecture(net)
    assert len(archs) == 2 * 2 * (2 * 2 * 2 * 2 * 2 * 2) * (2 * 2 * 2 * 2 * 2) * 2
    used: set[str] = set()
    for c in archs:
        used |= set(latency.op_keys(c))
    assert used == set(ops)
    assert any(k.startswith("skip") for k in ops) and any(k.startswith("add") for k in ops)
    ms = np.array([latency.ms(c) for c in archs])
    for c in archs[:: len(archs) // 9]:
        assert float(latency.expected(_one_hot(net, c))) == pytest.approx(latency.ms(c), rel=1e-12)
    assert latency.span() == pytest.approx((ms.min(), ms.max()), rel=1e-12)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.normal_()
    weights = {"resolution": net.alpha_resolution.double().softmax(-1)} | {
        k: [t.double().softmax(-1) for t in net._alphas(k)] for k in CHOICE_KEYS[1:]
    }
    probs = np.ones(len(archs))
    for a, c in enumerate(archs):
        probs[a] *= float(weights["resolution"][c["resolution"]])
        for k in CHOICE_KEYS[1:]:
            for g, i in zip(weights[k], c[k], strict=True):
                probs[a] *= float(g[i])
    assert float(latency.expected(weights)) == pytest.approx(float(probs @ ms), rel=1e-9)
