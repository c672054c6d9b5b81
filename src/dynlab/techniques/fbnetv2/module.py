"""`technique=fbnetv2`: DMaskingNAS search over widths, kernels, SE and input resolution, then the
searched network retrained (Wan et al., "FBNetV2", CVPR 2020).

The search space is the backbone (`dynlab.backbones.fbnetv2`: one supernet whose blocks run once at
their widest, channel options as Gumbel-weighted masks, resolution options as subsampled passes
placed back by interspersed zeros). The schedule:
- `search` (fit, two optimisers under manual optimisation): each step trains the weights on the
  `weights` stream (80 % of the train split) with the cross-entropy and, after `warmup_epochs`, the
  architecture logits on the `arch` stream (the other 20 %) with FBNet's multiplicative loss in a
  unit-free form, CE * alpha * (cost / reference)^beta (`search_loss`), the
  cost being the expected MACs, parameters or milliseconds (a latency table of the space on this
  machine, `latency.py`) of the Gumbel-weighted network, differentiable through the choice
  weights; with `target_mmacs` (`target_ms`), CE + target_weight * E|cost / target - 1| over
  architectures drawn from the logits' softmax (`arch_loss`). The temperature starts at
  `temperature` and is multiplied by
  `temperature_decay` every epoch. Gumbel noise is drawn from (seed, step, stream), so every DDP
  rank samples the same architecture and a resumed search the same noise;
- `retrain` (fit): the argmax architecture exported as a standalone network (`FBNetV2Net`, its MACs
  measured) and trained from scratch.
`dynlab-search` runs the search alone; `technique.architecture` (or `_file`) retrains a given
architecture alone. The deploy form is always the standalone network.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dynlab.backbones.fbnetv2 import CHOICE_KEYS, FBNetV2Supernet
from dynlab.config import BackboneConfig
from dynlab.data.base import DataInfo, DynlabDataModule, StreamSpec
from dynlab.data.sampling import rank_and_world_size
from dynlab.evaluation.macs import count_macs
from dynlab.results import update_results
from dynlab.search import (
    derived_seed,
    recalibrate_bn,
    seeded,
    write_result,
)
from dynlab.search.latency_table import TimingConfig, latency_summary
from dynlab.techniques.base import Phase, dataset_backbone
from dynlab.techniques.fbnetv2.config import COST_UNITS, CostKind, FBNetV2Config
from dynlab.techniques.fbnetv2.latency import FBNetV2Latency
from dynlab.techniques.supernet import SupernetTechnique
from dynlab.traits import backbone_needed

__all__ = [
    "FBNetV2Module",
    "cost_distance",
    "cost_span",
    "extreme_choices",
    "sampled_distance",
    "search_loss",
]

SEARCH = "search"
WEIGHTS, ARCH = "weights", "arch"  # the search phase's optimisers and train streams
# Independent seed streams derived from the technique's seed.
GUMBEL_STREAM, RETRAIN_STREAM, TARGET_STREAM = 0, 1, 2


def search_loss(ce: Tensor, cost: Tensor, alpha: float, beta: float, reference: float) -> Tensor:
    """FBNet's multiplicative loss (Sec. 3.3) in a form defined in every space and unit:
    CE * alpha * (cost / reference)^beta, the cost relative to `reference` (the space's cheapest
    architecture's). FBNet's own CE * alpha * log(cost)^beta, with latency in ms, depends on the
    unit: its elasticity d log L / d log cost is beta / log(cost), weak for raw MACs (about
    beta / 19 at 3e8) and undefined for costs below 1 (a tiny space's ms, or M MACs, where the log
    is negative). Here the elasticity is beta whatever the space or unit, and the factor is alpha
    at the cheapest architecture."""
    return ce * alpha * (cost / reference).pow(beta)


def cost_distance(cost: Tensor, target: float) -> Tensor:
    """The cost term of TuNAS's absolute reward, |cost / target - 1|: zero, with zero gradient, at
    the target, and slope 1 / target on either side (see FBNetV2Config.target_mmacs)."""
    return (cost / target - 1).abs()


def sampled_distance(
    net: FBNetV2Supernet,
    cost_of: Callable[[Mapping[str, Any]], Tensor],
    target: float,
    samples: int,
) -> Tensor:
    """The mean `cost_distance` of the costs (`cost_of` one-hot choice weights) of `samples`
    architectures drawn from the search's distribution (its softmax; torch's RNG), carrying in
    the logits the REINFORCE gradient of its expectation with a leave-one-out baseline: how TuNAS
    estimates its reward's gradient, here for the cost term only (the cross-entropy's gradient is
    the Gumbel-softmax one)."""
    probs = net.softmax_weights()
    groups = [probs["resolution"], *(g for k in CHOICE_KEYS[1:] for g in probs[k])]
    draws = [torch.multinomial(g.detach(), samples, replacement=True) for g in groups]
    log_p = torch.stack([g.log()[d] for g, d in zip(groups, draws, strict=True)]).sum(0)

    def one_hot(sample: int) -> dict[str, Any]:
        rows = iter(
            F.one_hot(d[sample], g.numel()).to(g) for g, d in zip(groups, draws, strict=True)
        )
        return {"resolution": next(rows)} | {
            k: [next(rows) for _ in probs[k]] for k in CHOICE_KEYS[1:]
        }

    with torch.no_grad():
        costs = torch.stack([cost_of(one_hot(s)) for s in range(samples)])
    distance = cost_distance(costs, target).to(log_p.dtype)
    baseline = (distance.sum() - distance) / max(samples - 1, 1)
    surrogate = ((distance - baseline) * log_p).mean()
    return distance.mean() + surrogate - surrogate.detach()


class FBNetV2Module(SupernetTechnique):
    """The DMaskingNAS supernet, its search and the retraining of the searched network."""

    phase_names = FBNetV2Config.PHASES
    technique, retrain_stream, old_state_key = "fbnetv2", RETRAIN_STREAM, "choices"
    space_fields = "backbone, its kwargs and dataset"

    config: FBNetV2Config

    def __init__(
        self, config: FBNetV2Config, backbone: BackboneConfig, data_info: DataInfo
    ) -> None:
        super().__init__(config, backbone)
        self.data_info = data_info
        self.cost_kind = CostKind(config.cost)
        net = dataset_backbone(backbone, data_info)
        if not isinstance(net, FBNetV2Supernet):
            raise ValueError(_not_a_supernet(backbone.name))
        problem = net.space_problem(data_info.input_size)
        problem = problem or _target_problem(net, config.target_mmacs)
        if problem:
            raise ValueError(f"fbnetv2 on backbone={backbone.name}: {problem}")
        self.unit, self.unit_scale = COST_UNITS[self.cost_kind]
        self.backbone_name = backbone.name
        self.history: list[dict[str, Any]] = []  # the argmax architecture after every epoch
        # The search's result or the given architecture (a `choices` dict).
        self.architecture: dict[str, Any] | None
        self.use_supernet(net)

    # --- phases -------------------------------------------------------------------------------
    def search_phases(self) -> list[Phase]:
        return [Phase(SEARCH)]

    def check_run(self, cfg: Any) -> None:
        """The search must be longer than its weights-only warm-up, and needs its two optimisers
        and streams (dynlab/conf/technique/fbnetv2.yaml)."""
        super().check_run(cfg)
        if self.given or cfg is None:
            return
        if self._latency is not None:  # the table is built (or read) now, before training
            problem = _target_ms_problem(self._latency.span(), self.config.target_ms)
            if problem:
                raise ValueError(f"fbnetv2 on backbone={self.backbone_name}: {problem}")
        recipe = self.recipe(SEARCH)
        epochs = recipe.epochs or cfg.trainer.max_epochs
        if epochs <= self.config.warmup_epochs:
            raise ValueError(
                f"fbnetv2: the search runs {epochs} epochs, not more than its warm-up of "
                f"{self.config.warmup_epochs}, so the architecture would never train; set "
                f"technique.phases.search.epochs above technique.warmup_epochs (or lower it)"
            )
        missing = {WEIGHTS, ARCH} - set(recipe.optimizers)
        missing |= {WEIGHTS, ARCH} - set(recipe.streams)
        if missing:
            raise ValueError(
                f"fbnetv2: the search phase's recipe lacks the optimiser(s)/stream(s) "
                f"{sorted(missing)}: technique.phases.search needs optimizers and streams named "
                f"'{WEIGHTS}' and '{ARCH}' (see dynlab/conf/technique/fbnetv2.yaml)"
            )

    def start_phase(self, phase: Phase) -> None:
        """The search steps its two optimisers itself."""
        super().start_phase(phase)
        self.automatic_optimization = phase.name != SEARCH

    # --- the search phase ---------------------------------------------------------------------
    @property
    def tau(self) -> float:
        """This epoch's Gumbel-softmax temperature."""
        return self.config.temperature * self.config.temperature_decay**self.current_epoch

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self.current_phase != SEARCH:
            return super().training_step(batch, batch_idx)
        # The weights step minimises the cross-entropy: the cost factor of `search_loss` does
        # not depend on the weights and would only rescale their step size with the cost weights
        # (FBNet's alpha, beta make it about 1; a strong beta would blow the weights up).
        ce, cost = self._ce_and_cost(batch[WEIGHTS], 0)
        self.manual_step(WEIGHTS, ce)
        logs = {"search/ce": ce.detach(), "search/tau": self.tau}
        if self.current_epoch >= self.config.warmup_epochs:
            arch_ce, cost = self._ce_and_cost(batch[ARCH], 1)
            arch_loss = self.arch_loss(arch_ce, cost)
            self.manual_step(ARCH, arch_loss)
            logs |= {"search/arch_loss": arch_loss.detach(), "search/arch_ce": arch_ce.detach()}
        logs[f"search/expected_{self.unit}"] = cost.detach() / self.unit_scale
        self.log_dict(logs, prog_bar=False)
        return None

    def arch_loss(self, ce: Tensor, cost: Tensor) -> Tensor:
        """The architecture step's loss: FBNet's on `cost` (that of the network the step sampled),
        or with a target (`target_mmacs`, `target_ms`) CE + target_weight * E|cost(a) / target - 1|
        over architectures a drawn from the search's distribution (`sampled_distance`, its draws
        from (seed, step)).
        Not the distance of the expectation, |E[MACs] / target - 1|: logits that all lean a little
        the same way meet it, and their argmax is an extreme of the space, where the distance of
        each draw rewards a distribution concentrated near the target. On the small space (random
        data, 200 architecture steps, Adam): a 10 M target left the argmax at 25-29 M with the
        former (lr 0.01); the latter landed it at 10.2 M, and a 20 M one at 20.5 M (lr 0.05)."""
        target = self.target
        if target is None:
            return search_loss(ce, cost, self.config.alpha, self.config.beta, self.cost_reference)
        with seeded(derived_seed(self.config.seed, TARGET_STREAM, self.global_step)):
            distance = sampled_distance(
                self._supernet, self.cost_of, target * self.unit_scale, self.config.target_samples
            )
        return ce + self.config.target_weight * distance.to(ce.dtype)

    @property
    def target(self) -> float | None:
        """The cost target in the cost's reported unit (M MACs or ms), or None: FBNet's loss."""
        return self.config.target_mmacs if self.config.target_ms is None else self.config.target_ms

    def _ce_and_cost(self, batch: tuple[Tensor, Tensor], stream: int) -> tuple[Tensor, Tensor]:
        """Cross-entropy on one stream's batch, with Gumbel noise from (seed, step, stream), and
        the expected cost of the architecture that forward sampled."""
        x, y = batch
        self._supernet.tau = self.tau  # every step: a resumed epoch has no epoch start
        with seeded(derived_seed(self.config.seed, GUMBEL_STREAM, self.global_step, stream)):
            logits = self.model.forward_exits(x)[-1]
        ce = F.cross_entropy(logits, y, label_smoothing=self.config.optim.label_smoothing)
        return ce, self.cost_of().to(ce.dtype)

    def cost_of(self, weights: Mapping[str, Any] | None = None) -> Tensor:
        """The search's differentiable cost (MACs, parameters or ms) of the choice weights
        `weights` (default: those of the last forward)."""
        net = self._supernet
        if self._latency is None:
            return net.expected_cost(self.cost_kind.value, weights)
        return self._latency.expected(net.last_weights() if weights is None else weights)

    @functools.cached_property
    def cost_reference(self) -> float:
        """What search_loss measures the cost against: the space's cheapest architecture's."""
        if self._latency is not None:
            return self._latency.span()[0]
        return cost_span(self._supernet, self.cost_kind.value)[0]

    @functools.cached_property
    def _latency(self) -> FBNetV2Latency | None:
        """The space's latency table on this machine when the cost is latency (built once per
        device and cached; DDP ranks time their own when none is cached), else None."""
        if self.cost_kind != CostKind.latency:
            return None
        timing = TimingConfig(threads=self.config.latency_threads)
        latency = FBNetV2Latency.build(self._supernet, self.data_info.input_size, timing)
        if rank_and_world_size()[0] == 0:
            print(latency_summary("fbnetv2", latency.table, latency.span()))
        return latency

    def on_validation_start(self) -> None:
        """The search is validated on its argmax network, with that network's BN statistics."""
        if self.current_phase == SEARCH and self.trainer.state.fn == "fit":
            self._recalibrate(self.trainer.datamodule)  # type: ignore[attr-defined]

    def _recalibrate(self, datamodule: DynlabDataModule) -> None:
        """Recompute the BN statistics of the supernet fixed at its argmax architecture over the
        first `recalibration_batches` of the weights stream's images (unaugmented, in order, the
        same on every rank), as SPOS does for its candidates."""
        net = self._supernet
        weights = self.recipe(SEARCH).streams[WEIGHTS]
        stream = StreamSpec(
            weights.key or WEIGHTS,
            fraction=weights.fraction,
            size=weights.size,
            complement=weights.complement,
            augment=False,
            shuffle=False,
            sharded=False,
        )
        net.fix(net.choices())
        try:
            recalibrate_bn(
                self.model, datamodule.stream_loader(stream), self.config.recalibration_batches
            )
        finally:
            net.unfix()

    def on_train_epoch_end(self) -> None:
        """Record the argmax architecture and its measured cost after every search epoch, and the
        expected MACs of the search's distribution (its softmax), which a target steers."""
        if self.current_phase != SEARCH:
            return
        net = self._supernet
        choices = net.choices()
        with seeded(self.config.seed):  # a throwaway network: the run's RNG must not move
            child = net.child(choices)
        with torch.no_grad():
            expected = float(net.expected_cost("macs", net.softmax_weights())) / 1e6
        entry = {
            "epoch": self.current_epoch,
            "tau": self.tau,
            "choices": choices,
            "mmacs": count_macs(child, self.data_info.input_size) / 1e6,
            "mparams": sum(p.numel() for p in child.parameters()) / 1e6,
            "expected_mmacs": expected,
        }
        if self._latency is not None:  # the table's prediction, and the softmax's expectation
            with torch.no_grad():
                softmax_ms = float(self._latency.expected(net.softmax_weights()))
            entry |= {"predicted_ms": self._latency.ms(choices), "expected_ms": softmax_ms}
        self.history = [h for h in self.history if h["epoch"] < entry["epoch"]] + [entry]
        self.log_dict(
            {"search/argmax_mmacs": entry["mmacs"], "search/softmax_expected_mmacs": expected}
            | {f"search/argmax_{k}": v for k, v in entry.items() if k == "predicted_ms"}
        )

    def on_fit_end(self) -> None:
        """At the end of the search: the argmax architecture becomes the result."""
        if self.current_phase != SEARCH or not self.history:
            return
        last = {
            **self.history[-1],
            "target_mmacs": self.config.target_mmacs,
            "target_ms": self.config.target_ms,
        }
        self.architecture = last["choices"]
        self._recalibrate(self.trainer.datamodule)  # type: ignore[attr-defined]
        summary = {
            "search": "fbnetv2",
            "architecture": last["choices"],
            **{k: v for k, v in last.items() if k != "choices"},
            "history": self.history,
            "cost": self.cost_kind.value,
        }
        phase_dir = Path(self.trainer.default_root_dir)  # <run dir>/checkpoints/search
        if rank_and_world_size()[0] == 0:
            path = write_result(phase_dir, summary)
            update_results(
                phase_dir.parents[1], search={k: v for k, v in summary.items() if k != "history"}
            )
            target = "" if self.target is None else f" (target {self.target:g} {self.unit})"
            ms = f", {last['predicted_ms']:.3f} ms predicted" if "predicted_ms" in last else ""
            print(
                f"[dynlab] fbnetv2 search: {last['mmacs']:.2f} M MACs{ms}{target}, "
                f"{last['mparams']:.3f} M parameters (the search's softmax expects "
                f"{last['expected_mmacs']:.2f} M MACs): {last['choices']}; {path}"
            )

    # --- technique state ----------------------------------------------------------------------
    def architecture_problem(self, architecture: Any) -> str | None:
        if not isinstance(architecture, Mapping):
            return f"{architecture!r} is not a dict of choices (as a search's result holds)"
        return self._supernet.choice_problem(dict(architecture))

    def parse_architecture(self, architecture: Any) -> dict[str, Any]:
        return dict(architecture)

    def search_state(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_search_state(self, state: dict[str, Any]) -> None:
        self.history = state.get("history", [])


def extreme_choices(
    net: FBNetV2Supernet, pick: Callable[[Sequence[Any]], Any], kind: str = "macs"
) -> dict[str, Any]:
    """The cheapest (`pick=min`) or dearest (`max`) architecture of the space: every choice's
    smallest or largest option (the `kind` cost grows with each: resolution, widths, hidden
    width, kernel, SE; activations cost none), then per block the op (ir or skip) that costs
    least (most) given them, block by block."""

    def index(options: Sequence[Any]) -> int:
        return list(options).index(pick(options))

    blocks = net.search_blocks
    choices: dict[str, Any] = {
        "resolution": index(net.resolutions),
        "stem": [index(net.stem_widths)],
        "widths": [index(b.outs) for b in blocks],
        "ops": [0] * len(blocks),
        "expansions": [index(b.mids) for b in blocks],
        "kernels": [index(net.kernels)] * len(blocks),
        "se": [index(net.se_options)] * len(blocks),
        "acts": [0] * len(blocks),
        "head": [index(net.head_widths)],
    }
    before = net.fixed
    for j, b in enumerate(blocks):
        costs = []
        for op in range(len(b.ops)):
            choices["ops"][j] = op
            net.fix(choices)
            costs.append(float(net.expected_cost(kind)))
        choices["ops"][j] = costs.index(pick(costs))
    if before is None:
        net.unfix()
    else:
        net.fix(before)
    return choices


def cost_span(net: FBNetV2Supernet, kind: str) -> tuple[float, float]:
    """The `kind` cost of the space's cheapest and dearest architectures."""
    span = []
    for pick in (min, max):
        net.fix(extreme_choices(net, pick, kind))
        span.append(float(net.expected_cost(kind)))
    net.unfix()
    return span[0], span[1]


def _target_problem(net: FBNetV2Supernet, target_mmacs: float | None) -> str | None:
    """Why `target_mmacs` lies outside the MACs of the space's architectures (one line), or None."""
    if target_mmacs is None:
        return None
    span = [macs / 1e6 for macs in cost_span(net, "macs")]
    if span[0] <= target_mmacs <= span[1]:
        return None
    return (
        f"technique.target_mmacs={target_mmacs:g} lies outside the space, whose architectures "
        f"span {span[0]:.3f} M to {span[1]:.3f} M MACs: set a target inside it"
    )


def _target_ms_problem(span: tuple[float, float], target_ms: float | None) -> str | None:
    """Why `target_ms` lies outside the predicted latency of the space (one line), or None."""
    if target_ms is None or span[0] <= target_ms <= span[1]:
        return None
    return (
        f"technique.target_ms={target_ms:g} lies outside the space, whose architectures span "
        f"{span[0]:.3f} to {span[1]:.3f} ms per image on this machine (its latency table's "
        "prediction): set a target inside it"
    )


def _not_a_supernet(name: str) -> str:
    return backbone_needed("fbnetv2", name)
