"""dynlab.search: the ledger, BN recalibration, candidate training on the real loaders, scoring,
candidates spread over ranks with signals honoured at candidate boundaries, and dynlab-search
spreading an S2DNAS search over two gloo processes from the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from dynlab.config import OptimConfig
from dynlab.data.base import StreamSpec
from dynlab.data.synthetic import SyntheticDataModule
from dynlab.preemption import Preempted, recording_signals
from dynlab.search import (
    CandidateTrainer,
    Ledger,
    derived_seed,
    evaluate_spread,
    exit_accuracies,
    recalibrate_bn,
    seeded,
    train_candidate,
    val_exit_probs,
)
from dynlab.search import ledger as ledger_module

from .conftest import S2D_SEARCH, run_cli


class TwoExits(nn.Module):
    """A tiny multi-exit network with BatchNorm (the protocol's `forward_exits`)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.exits = nn.ModuleList([nn.Linear(4, 10), nn.Linear(4, 10)])

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        h = self.body(x).mean(dim=(2, 3))
        return [self.exits[0](h), self.exits[1](h * 2)]


def synthetic() -> SyntheticDataModule:
    return SyntheticDataModule(num_train=72, num_test=8, val_size=24, image_size=8, batch_size=8)


def test_ledger_saves_atomically_resumes_and_only_rank_zero_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger(tmp_path)
    assert not ledger.load()
    ledger.state = {"step": 1}
    ledger.add([{"index": 1, "score": 0.5}, {"index": 0, "score": 0.2}])
    ledger.save()
    assert [r["index"] for r in json.loads((tmp_path / "candidates.json").read_text())] == [0, 1]
    again = Ledger(tmp_path)
    assert again.load() and again.done() == {0, 1} and again.state == {"step": 1}
    with pytest.raises(ValueError, match="already"):
        again.add([{"index": 1}])
    monkeypatch.setattr(ledger_module, "rank_and_world_size", lambda: (1, 2))
    again.add([{"index": 2}])
    again.save()
    assert Ledger(tmp_path).load() and len(json.loads(again.records_path.read_text())) == 2


def test_bn_recalibration_is_the_exact_mean_over_the_subset() -> None:
    model = TwoExits().eval()
    bn = model.body[1]
    bn.running_mean.fill_(5.0)
    batches = [(torch.randn(6, 3, 8, 8), torch.zeros(6)) for _ in range(4)]
    assert recalibrate_bn(model, iter(batches), num_batches=3) == 3
    conv = model.body[0]
    with torch.no_grad():
        means = [conv(x).mean(dim=(0, 2, 3)) for x, _ in batches[:3]]
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0))
    assert bn.momentum == 0.1 and not model.training and int(bn.num_batches_tracked) == 3


def test_candidates_train_on_the_stream_reproducibly_and_score_on_val() -> None:
    dm = synthetic()
    spec = StreamSpec("candidates", sharded=False)

    def trained(seed: int) -> tuple[nn.Module, list[float]]:
        with seeded(seed):
            model = TwoExits()
            before = [p.clone() for p in model.parameters()]
            optim = OptimConfig(lr=0.05, warmup_epochs=0)
            loss = lambda logits, y: sum(nn.functional.cross_entropy(z, y) for z in logits)  # noqa: E731
            train_candidate(model, loss, optim, dm.stream_loader(spec), 2, 3, CandidateTrainer())
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        probs, targets = val_exit_probs(model, dm.whole_val_loader())
        assert probs.shape == (2, 24, 10) and len(targets) == 24
        return model, exit_accuracies(probs, targets)

    first, accuracies = trained(derived_seed(0, 0, 1))
    second, again = trained(derived_seed(0, 0, 1))
    assert accuracies == again
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(0 <= a <= 100 for a in accuracies)


def test_a_signal_is_honoured_at_the_next_candidate_boundary(tmp_path: Path) -> None:
    evaluated: list[int] = []

    def evaluate(index: int) -> dict[str, Any]:
        if index == 1 and not evaluated.count(1):
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives mid-candidate
        evaluated.append(index)
        return {"score": index * 10}

    ledger = Ledger(tmp_path)
    with recording_signals(), pytest.raises(Preempted, match="after candidate 1"):
        evaluate_spread(range(4), evaluate, ledger)
    saved = Ledger(tmp_path)
    assert saved.load() and saved.done() == {0, 1}  # candidate 1 finished and was saved
    with recording_signals():
        evaluate_spread([i for i in range(4) if i not in saved.done()], evaluate, saved)
    assert evaluated == [0, 1, 2, 3]
    assert [(r["index"], r["rank"], r["score"]) for r in saved.records] == [
        (i, 0, i * 10) for i in range(4)
    ]


TINY_SEARCH = [
    *S2D_SEARCH,
    "technique.search.iterations=2",
    "technique.search.candidate_batches=1",
    "technique.search.top_k=1",
    "technique.search.retrain_epochs=1",
    "dataset.batch_size=32",
    "trainer.max_epochs=1",
    "logger=csv",
]


@pytest.mark.slow
def test_dynlab_search_spreads_candidates_over_two_gloo_processes(tmp_path: Path) -> None:
    ledgers = {}
    for name, trainer in [("one", "trainer=cpu"), ("two", "trainer=ddp_cpu")]:
        run = tmp_path / name
        run_cli("search", [*TINY_SEARCH, trainer, f"hydra.run.dir={run}"], cwd=tmp_path)
        ledgers[name] = json.loads((run / "checkpoints" / "search" / "candidates.json").read_text())
        assert json.loads((run / "results.json").read_text())["status"] == "completed"
    assert [c["rank"] for c in ledgers["one"]] == [0, 0, 0, 0]
    assert [c["rank"] for c in ledgers["two"]] == [0, 1, 0, 1]
    same = ("index", "round", "tokens", "settings", "exit_macs")
    for one, two in zip(ledgers["one"], ledgers["two"], strict=True):
        assert {k: one[k] for k in same} == {k: two[k] for k in same}
        assert one["reward"] == pytest.approx(two["reward"], abs=1e-6)


def test_the_search_package_imports_no_technique_and_no_app() -> None:
    code = (
        "import sys, dynlab.search; "
        "print([m for m in sys.modules if m.startswith(('dynlab.techniques', 'dynlab.apps'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
