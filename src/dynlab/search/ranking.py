"""How well a weight-sharing supernet ranks architectures, as a search on the driver: one round of
sampled architectures, each scored with inherited weights (BN recalibrated, `PathScorer`) and
trained alone for a fixed budget under several seeds, both on the same held-out images; the
result is the agreement of the inherited order, and of the controls (parameters, MACs, a random
order), with the trained-alone order, and the agreement of the seeds with each other (the best a
proxy can reach when the truth itself is this noisy). Candidates run where the driver puts them
(this job's ranks or a Slurm array) and a killed ranking resumes at the next architecture.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynlab.atomic import atomic_open
from dynlab.config import OptimConfig
from dynlab.data.base import DynlabDataModule, StreamSpec
from dynlab.evaluation.ranking import agreement
from dynlab.protocol import StaticExits
from dynlab.search.candidates import CandidateTrainer, train_candidate
from dynlab.search.driver import NoCandidates, Search, SearchRNG, for_array_task, search_identity
from dynlab.search.scoring import exit_accuracies, val_exit_probs
from dynlab.search.seeds import derived_seed, seeded
from dynlab.search.supernet import PathScorer

__all__ = ["AloneTrainer", "RankingStudy", "ranking_table"]

Genes = tuple[int, ...]
# The seed stream of a trained-alone run (seed s: derived_seed(seed, ALONE_STREAM, s)): the same
# architecture and seed train the same in every ranking of a run's seed, whatever its index.
ALONE_STREAM = 7
RESULT_STREAM = 8  # the random control and the bootstrap
# Settings that change neither the architectures nor their scores.
NOT_IDENTITY = ("candidates_on", "top_k", "bootstrap", "alone_cache")
CONTROLS = ("params", "macs", "random")


def _cross_entropy(logits: list[Tensor], y: Tensor, smoothing: float) -> Tensor:
    return F.cross_entropy(logits[-1], y, label_smoothing=smoothing)


@dataclass
class AloneTrainer:
    """Trains an architecture's standalone net (`build`) from scratch, once per seed, on the
    train split less the held-out val, and scores it on the first `val_images` of the held-out
    split. With `cache` (a folder), a score already computed under the same `key` is read back."""

    build: Callable[[Genes], nn.Module]
    datamodule: DynlabDataModule
    optim: OptimConfig
    epochs: int
    batches_per_epoch: int | None
    val_images: int | None
    seed: int
    trainer: CandidateTrainer
    key: Mapping[str, Any]
    cache: str | None = None

    def __call__(self, genes: Genes, seed: int) -> float:
        path = self._cached(genes, seed)
        if path is not None and path.is_file():
            return float(json.loads(path.read_text())["top1"])
        with seeded(derived_seed(self.seed, ALONE_STREAM, seed)):
            model = StaticExits(self.build(genes))
            stream = StreamSpec(f"rank/alone{seed}", sharded=False)
            train_candidate(
                model,
                partial(_cross_entropy, smoothing=self.optim.label_smoothing),
                self.optim,
                self.datamodule.stream_loader(stream),
                self.epochs,
                self.batches_per_epoch,
                self.trainer,
            )
        probs, targets = val_exit_probs(model, self.datamodule.whole_val_loader(self.val_images))
        top1 = float(exit_accuracies(probs, targets)[0])
        if path is not None:
            with atomic_open(path) as f:
                json.dump({"genes": list(genes), "seed": seed, "top1": top1}, f)
        return top1

    def _cached(self, genes: Genes, seed: int) -> Path | None:
        if self.cache is None:
            return None
        text = json.dumps({**self.key, "genes": list(genes), "seed": seed}, sort_keys=True)
        return Path(self.cache) / f"{hashlib.sha1(text.encode()).hexdigest()[:20]}.json"


class RankingStudy(Search):
    """One round of `cfg.architectures` distinct architectures (drawn with `draw`, or read from a
    list, keeping those inside the space), each scored by `inherited` and `alone`."""

    name, round_name = "ranking", "round"

    def __init__(
        self,
        draw: Callable[[np.random.Generator], Genes],
        contains: Callable[[Genes], bool],
        inherited: PathScorer,
        alone: AloneTrainer,
        macs_of: Callable[[Genes], float],
        params_of: Callable[[Genes], int],
        cfg: Any,
        space: Mapping[str, Any],
        data: Mapping[str, Any],
        given: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.draw, self.contains, self.inherited, self.alone = draw, contains, inherited, alone
        self.macs_of, self.params_of, self.cfg = macs_of, params_of, cfg
        self.given = [tuple(int(g) for g in genes) for genes in given] if given else None
        recipe = {k: v for k, v in alone.key.items() if k != "space"}
        self._identity = search_identity(
            {**space, "given": [list(g) for g in self.given] if self.given else None},
            {**data, "alone": recipe},
            cfg,
            *NOT_IDENTITY,
        )

    @property
    def rounds(self) -> int:
        return 1

    def identity(self) -> dict[str, Any]:
        return self._identity

    def propose(self, rng: SearchRNG, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.given is not None:
            inside = [g for g in dict.fromkeys(self.given) if self.contains(g)]
            chosen = inside[: self.cfg.architectures]
        else:
            seen: dict[Genes, None] = {}
            for _ in range(100 * self.cfg.architectures):
                if len(seen) == self.cfg.architectures:
                    break
                seen.setdefault(tuple(int(g) for g in self.draw(rng.numpy)), None)
            chosen = list(seen)
        if len(chosen) < 3:
            raise NoCandidates(
                f"{len(chosen)} distinct architectures of the space to rank (a rank correlation "
                "needs three)"
            )
        return [{"genes": list(g)} for g in chosen]

    def score(self, candidate: Mapping[str, Any], index: int) -> dict[str, Any]:
        start = time.perf_counter()
        genes = tuple(candidate["genes"])
        inherited = float(self.inherited(genes)["top1"])
        alone = [self.alone(genes, s) for s in range(self.cfg.seeds)]
        return {
            "inherited_top1": inherited,
            "alone_top1": alone,
            "macs": float(self.macs_of(genes)),
            "params": int(self.params_of(genes)),
            "seconds": time.perf_counter() - start,
        }

    def result(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The agreements with the mean trained-alone top-1 (`rows`), the seeds' own agreement
        (`seeds`, each seed against the next) and every architecture's scores."""
        cfg = self.cfg
        truth = [float(np.mean(r["alone_top1"])) for r in records]
        rng = np.random.default_rng(derived_seed(self.alone.seed, RESULT_STREAM))
        orders: dict[str, list[float]] = {
            "inherited": [r["inherited_top1"] for r in records],
            "params": [float(r["params"]) for r in records],
            "macs": [r["macs"] for r in records],
            "random": rng.permutation(len(records)).astype(float).tolist(),
        }
        rows, notes = {}, {}
        for name, proxy in orders.items():
            try:
                rows[name] = agreement(proxy, truth, cfg.top_k, cfg.bootstrap, rng).as_dict()
            except ValueError as err:
                notes[name] = str(err)
        seeds = []
        for s in range(cfg.seeds - 1):
            first, second = ([r["alone_top1"][k] for r in records] for k in (s, s + 1))
            seeds.append(agreement(first, second, cfg.top_k, cfg.bootstrap, rng).as_dict())
        picked = max(records, key=lambda r: (r["inherited_top1"], -r["index"]))
        return {
            # The supernet's pick among the sample (what a search of it would retrain).
            "architecture": list(picked["genes"]),
            "truth": f"mean val top-1 trained alone over {cfg.seeds} seeds, {cfg.epochs} epochs",
            "rows": rows,
            "seeds": seeds,
            "notes": notes,
            "architectures": [
                {k: r[k] for k in ("genes", "inherited_top1", "alone_top1", "macs", "params")}
                for r in records
            ],
        }

    def for_task(self) -> RankingStudy:
        """A Slurm array task's copy: the scorer detached, the trainer on the task's GPU."""
        task = copy.copy(self)
        task.inherited = self.inherited.detached()
        task.alone = replace(
            self.alone,
            datamodule=for_array_task(self.alone.datamodule),
            trainer=replace(self.alone.trainer, device_index=0),
        )
        return task

    def gpus_per_task(self) -> int:
        return int(self.alone.trainer.accelerator == "gpu")


def ranking_table(result: Mapping[str, Any], title: str) -> str:
    """The result as markdown: one row per ordering, then the seeds' agreement."""
    lines = [
        f"# {title}",
        "",
        f"{len(result['architectures'])} architectures; truth: {result['truth']}. Intervals: 95 % "
        "bootstrap over the architectures.",
        "",
        "| ordering | Kendall tau | Spearman rho | top-k tau | top-k overlap |",
        "| --- | --- | --- | --- | --- |",
    ]
    named = [(name, row) for name, row in result["rows"].items()]
    named += [(f"seed {i} vs seed {i + 1} (ceiling)", row) for i, row in enumerate(result["seeds"])]
    for name, row in named:
        lines.append(
            f"| {name} | {_fmt(row['tau'])} ({_fmt(row['tau_low'])}, {_fmt(row['tau_high'])}) "
            f"| {_fmt(row['rho'])} ({_fmt(row['rho_low'])}, {_fmt(row['rho_high'])}) "
            f"| {_fmt(row['top_k_tau'])} (k={row['top_k']}) | {row['top_k_overlap']:.2f} |"
        )
    for name, note in result.get("notes", {}).items():
        lines.append(f"\n{name}: {note}")
    return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.2f}"


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def params_on_meta(build: Callable[[Genes], nn.Module], genes: Genes) -> int:
    """Parameters of `build(genes)`, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return count_params(build(genes))
