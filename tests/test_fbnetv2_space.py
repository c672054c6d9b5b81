"""dynlab.backbones.fbnetv2: the DMaskingNAS supernet (FBNetV2, Wan et al. 2020) against its
exported children, its expected MACs and parameters against count_macs and the children's
parameter counts, its Gumbel choices and checks, and the published FBNetV2-F models against
mobile-vision's model_info figures."""

from __future__ import annotations

import fnmatch
import itertools
import json
import random
from typing import Any

import pytest
import timm
import torch
from torch import nn

import dynlab.backbones  # noqa: F401  (registers)
from dynlab.backbones.fbnetv2 import (
    CHOICE_KEYS,
    PUBLISHED,
    FBNetV2Net,
    FBNetV2Supernet,
    divisible_width,
    expand_rows,
    published_choices,
    se_width,
)
from dynlab.evaluation.macs import count_macs
from dynlab.nn.fuse import fold_batchnorm

# A tiny 32x32-style space on 16x16 inputs: 3 stages (stride 1, 2, 2), 4 searchable blocks, three
# resolutions including a fractional ratio (12/16).
TINY: dict[str, Any] = {
    "space": "cifar",
    "stage_widths": [[8, 16], [16, 24], [24, 32]],
    "repeats": [1, 2, 1],
    "expansions": [1, 3],
    "resolutions": [16, 12, 8],
    "head_width": 32,
    "num_classes": 5,
}
# The same with every kind of choice: stem and head widths, per-block widths whose options meet
# (residual adds, identity skips and pw-less blocks at equal widths), the skip op on stride-1
# blocks, activation options, hidden widths on a grid of 8.
WIDE: dict[str, Any] = {
    **TINY,
    "stage_widths": [[8, 16], [16, 24], [16, 24]],
    "repeats": [2, 1, 2],
    "strides": [1, 2, 1],
    "acts": [["relu", "hswish"], "relu", ["hswish", "relu"]],
    "hidden_step": 8,
    "skip": True,
    "stem_width": [8, 16],
    "first_width": 0,
    "head_width": [24, 32],
}
SIZE = (3, 16, 16)
IMAGENET = (3, 224, 224)


def _tiny(space: dict[str, Any] = TINY, **kwargs: Any) -> FBNetV2Supernet:
    torch.manual_seed(0)
    net = FBNetV2Supernet(**{**space, **kwargs})
    _randomise(net)
    return net


@torch.no_grad()
def _randomise(net: nn.Module) -> None:
    """Non-trivial BN statistics/affines, biases and classifier, so equalities mean something."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.uniform_(-0.5, 0.5)
        if isinstance(m, nn.Linear):
            m.weight.normal_(0, 0.3)


def _random_choices(net: FBNetV2Supernet, rng: random.Random) -> dict[str, Any]:
    counts = net._option_counts()
    return {
        k: rng.randrange(counts[k][0])
        if k == "resolution"
        else [rng.randrange(n) for n in counts[k]]
        for k in CHOICE_KEYS
    }


def _extreme(net: FBNetV2Supernet, cheapest: bool) -> dict[str, Any]:
    """All narrowest / smallest / off (cheapest) or all widest / largest / on choices, every
    block an ir block with its first activation."""
    pick = min if cheapest else max

    def index(values: tuple) -> int:
        return values.index(pick(values))

    n = len(net.search_blocks)
    return {
        "resolution": index(net.resolutions),
        "stem": [index(net.stem_widths)],
        "widths": [index(b.outs) for b in net.search_blocks],
        "ops": [0] * n,
        "expansions": [index(b.mids) for b in net.search_blocks],
        "kernels": [index(net.kernels)] * n,
        "se": [index(net.se_options)] * n,
        "acts": [0] * n,
        "head": [index(net.head_widths)],
    }


@pytest.mark.parametrize("space", [TINY, WIDE], ids=["tiny", "wide"])
def test_fixed_supernet_equals_its_child_also_after_folding_batchnorm(
    space: dict[str, Any],
) -> None:
    net = _tiny(space).eval()
    rng = random.Random(0)
    x = torch.randn(2, *SIZE)
    cases = [_extreme(net, True), _extreme(net, False)] + [
        _random_choices(net, rng) for _ in range(6 if space is TINY else 24)
    ]
    seen: dict[str, set] = {"resolution": set(), "kernels": set(), "se": set(), "rules": set()}
    for choices in cases:
        net.fix(choices)
        child = net.child(choices).eval()
        assert isinstance(child, FBNetV2Net) and child.choices == choices
        assert child.resolution == net.resolutions[choices["resolution"]]
        assert child.resize == "nearest"  # the supernet's subsampling, so that they agree
        with torch.no_grad():
            logits, features = net(x), net.forward_features(x).mean((2, 3))
            assert torch.allclose(child(x), logits, atol=1e-5), net.decode(choices)
            assert torch.allclose(child.forward_features(x).mean((2, 3)), features, atol=1e-5)
            assert logits.abs().max() > 1e-2  # not trivially equal
        folded = fold_batchnorm(child)
        assert folded and not any(isinstance(m, nn.BatchNorm2d) for m in child.modules())
        with torch.no_grad():
            assert torch.allclose(child(x), logits, atol=1e-5)
        seen["resolution"].add(choices["resolution"])
        seen["kernels"].update(choices["kernels"])
        seen["se"].update(choices["se"])
        for spec in child.specs:  # which of mobile-vision's equal-width rules the child met
            seen["rules"].add("residual" if spec.residual else "plain")
            if spec.op == "skip":
                seen["rules"].add("identity" if spec.cin == spec.cout else "projection")
            elif not spec.pw:
                seen["rules"].add("no pw")
    assert {k: v for k, v in seen.items() if k != "rules"} == {
        "resolution": {0, 1, 2},
        "kernels": {0, 1},
        "se": {0, 1},
    }
    if space is WIDE:
        assert seen["rules"] == {"residual", "plain", "identity", "projection", "no pw"}
    # a different choice gives a different network (the fixed weights matter)
    net.fix(cases[0])
    with torch.no_grad():
        assert not torch.allclose(net(x), net.child(cases[1]).eval()(x), atol=1e-3)


@pytest.mark.parametrize("space", [TINY, WIDE], ids=["tiny", "wide"])
def test_expected_macs_equals_count_macs_of_the_child_at_one_hot_choices(
    space: dict[str, Any],
) -> None:
    net = _tiny(space)
    rng = random.Random(1)
    for choices in [_extreme(net, True), _extreme(net, False)] + [
        _random_choices(net, rng) for _ in range(5)
    ]:
        net.fix(choices)
        assert net.expected_macs().item() == count_macs(net.child(choices), SIZE)
        net.eval()(torch.zeros(1, *SIZE))  # after a forward too (fixed weights, eval)
        assert net.expected_macs().item() == count_macs(net.standalone(choices), SIZE)
    net.unfix()
    net.eval()(torch.zeros(1, *SIZE))  # eval: the argmax child
    assert net.expected_macs().item() == count_macs(net.child(net.choices()), SIZE)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("space", [TINY, WIDE], ids=["tiny", "wide"])
def test_expected_params_equals_the_childs_parameter_count_at_one_hot_choices(
    space: dict[str, Any],
) -> None:
    net = _tiny(space)
    rng = random.Random(3)
    cases = [_extreme(net, True), _extreme(net, False)] + [
        _random_choices(net, rng) for _ in range(6)
    ]
    counts = set()
    for choices in cases:
        net.fix(choices)
        count = _params(net.child(choices))
        assert net.expected_params().item() == count, net.decode(choices)
        counts.add(count)
        net.eval()(torch.zeros(1, *SIZE))  # after a forward too (fixed weights, eval)
        assert net.expected_params().item() == count
        # the resolution changes MACs, not parameters
        other = {**choices, "resolution": (choices["resolution"] + 1) % len(net.resolutions)}
        net.fix(other)
        assert net.expected_params().item() == count
    assert len(counts) == len(cases)  # the choices do change the count
    # the classifier is counted: removing it removes its weights and biases
    net.reset_classifier(0)
    net.fix(cases[2])
    assert net.expected_params().item() == _params(net.child(cases[2]))
    assert net.expected_params().item() == _params(net.standalone(cases[2]))


@pytest.mark.parametrize("name", ["fbnetv2_f_supernet", "cifar_fbnetv2_supernet"])
def test_expected_costs_are_exact_on_the_full_spaces(name: str) -> None:
    """The full spaces, built on meta and given storage without init (only shapes matter);
    the children are built and measured on meta."""
    with torch.device("meta"):
        net = timm.create_model(name)
    net = net.to_empty(device="cpu")
    size = IMAGENET if name.startswith("fbnetv2") else (3, 32, 32)
    rng = random.Random(2)
    cases = [_extreme(net, True), _extreme(net, False)] + [
        _random_choices(net, rng) for _ in range(3)
    ]
    for choices in cases:
        net.fix(choices)
        with torch.device("meta"):
            child = net.standalone(choices)
        assert net.expected_macs().item() == count_macs(child, size), net.decode(choices)
        assert net.expected_params().item() == _params(child), net.decode(choices)
    for choices in [_random_choices(net, rng) for _ in range(5)]:  # parameters are cheap
        net.fix(choices)
        with torch.device("meta"):
            child = net.standalone(choices)
        assert net.expected_params().item() == _params(child), net.decode(choices)


def test_expected_macs_is_differentiable_bounded_and_follows_the_logits() -> None:
    net = _tiny().train()
    x = torch.randn(2, *SIZE)
    low = _extreme(net, True)
    high = _extreme(net, False)
    net.fix(low)
    cheapest = net.expected_macs().item()
    net.fix(high)
    dearest = net.expected_macs().item()
    net.unfix()
    torch.manual_seed(5)
    net(x)
    cost = net.expected_macs()
    assert cost.dtype == torch.float64 and cheapest < cost.item() < dearest
    cost.backward()
    for name, p in net.named_parameters():
        if "alpha" in name and p.numel() > 1:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the same Gumbel noise with logits favouring narrower block widths costs less
    with torch.no_grad():
        for j in range(len(net.search_blocks)):
            getattr(net, f"alpha_width_{j}")[0] += 2.0
    torch.manual_seed(5)
    net(x)
    assert net.expected_macs().item() < cost.item()


def test_expected_params_is_differentiable_bounded_and_ignores_the_resolution() -> None:
    net = _tiny().train()
    x = torch.randn(2, *SIZE)
    net.fix(_extreme(net, True))
    cheapest = net.expected_params().item()
    net.fix(_extreme(net, False))
    dearest = net.expected_params().item()
    net.unfix()
    torch.manual_seed(5)
    net(x)
    cost = net.expected_params()
    macs = net.expected_macs().item()
    assert cost.dtype == torch.float64 and cheapest < cost.item() < dearest
    cost.backward()
    for name, p in net.named_parameters():
        if name == "alpha_resolution":
            assert p.grad is None or not p.grad.any()
        elif "alpha" in name and p.numel() > 1:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the same Gumbel noise with other resolution logits: the same parameters, other MACs
    with torch.no_grad():
        net.alpha_resolution.copy_(torch.tensor([-3.0, 0.0, 3.0]))
    torch.manual_seed(5)
    net(x)
    assert net.expected_params().item() == cost.item()
    assert net.expected_macs().item() < macs
    # ... and logits favouring smaller expansions: fewer parameters
    with torch.no_grad():
        for i in range(len(net.search_blocks)):
            getattr(net, f"alpha_expansion_{i}")[0] += 2.0
    torch.manual_seed(5)
    net(x)
    assert net.expected_params().item() < cost.item()
    with pytest.raises(ValueError, match="cost kind"):
        net.expected_cost("flops")


def test_expected_costs_are_the_exact_expectation_over_independent_choices() -> None:
    """Soft Gumbel weights of a 2048-child space (x 2 resolutions, with stem, head, skip and
    equal-width choices): expected_params and expected_macs equal the probability-weighted sum
    of their one-hot values (the children's exact costs, tested above) over every child:
    products of independent widths, the equal-width terms and SE's rounded bottleneck are exact
    expectations (float64, so the weights sum to 1 to 1e-16)."""
    torch.manual_seed(0)
    small = {"stage_widths": [[8, 16], [16, 24]], "repeats": [1, 1], "strides": [1, 2]}
    small |= {"resolutions": [16, 8]}
    net = FBNetV2Supernet(**{**WIDE, **small, "acts": ["relu", "hswish"]}).double()
    net.tau = 4.0  # clearly soft weights
    net.train()(torch.randn(1, *SIZE, dtype=torch.float64))
    w = net.last_weights()
    soft = {k: net.expected_cost(k).item() for k in ("params", "macs")}
    groups = [(k, i, t.detach()) for k in CHOICE_KEYS[1:] for i, t in enumerate(w[k])]
    groups = [g for g in groups if g[2].numel() > 1]  # the one-option groups are 1
    assert all(0.05 < float(t.max()) < 0.95 for _, _, t in groups)  # every group is soft
    g_res = w["resolution"].detach()
    want = {"params": 0.0, "macs": 0.0}
    for picks in itertools.product(*[range(t.numel()) for _, _, t in groups]):
        choices: dict[str, Any] = {k: [0] * len(w[k]) for k in CHOICE_KEYS[1:]}
        prob = 1.0
        for (k, i, t), j in zip(groups, picks, strict=True):
            choices[k][i] = j
            prob *= float(t[j])
        for r in range(len(net.resolutions)):
            net.fix({**choices, "resolution": r})  # one-hot: the child's exact costs (above)
            want["macs"] += prob * float(g_res[r]) * net.expected_macs().item()
            want["params"] += prob * float(g_res[r]) * net.expected_params().item()
    for k in want:
        assert soft[k] == pytest.approx(want[k], rel=1e-12, abs=0), k


def test_gumbel_choices_train_samples_eval_argmax_fix_and_unfix() -> None:
    net = _tiny()
    x = torch.randn(2, *SIZE)
    net.train()
    net.tau = 1.0
    net(x)
    soft = net.last_weights()
    flat = [soft["resolution"]] + [t for k in CHOICE_KEYS[1:] for t in soft[k]]
    assert all(torch.allclose(t.sum(), torch.tensor(1.0), atol=1e-6) for t in flat)
    assert any(0.05 < float(t.detach().max()) < 0.95 for t in flat)  # soft at tau 1
    net.tau = 1e-4
    net(x)
    cold = net.last_weights()
    assert all(float(t.detach().max()) > 0.99 for t in [cold["resolution"], *cold["widths"]])
    # eval: the one-hot argmax of the logits, i.e. the child of choices()
    with torch.no_grad():
        net.alpha_resolution.copy_(torch.tensor([0.0, 3.0, 1.0]))
        net.alpha_width_1.copy_(torch.tensor([0.0, 2.0]))
        net.alpha_kernel_2.copy_(torch.tensor([1.0, 0.0]))
    choices = net.choices()
    assert choices["resolution"] == 1 and choices["widths"][1] == 1 and choices["kernels"][2] == 0
    assert json.loads(json.dumps(choices)) == choices
    net.eval()
    with torch.no_grad():
        y = net(x)
        assert torch.allclose(y, net.child(choices).eval()(x), atol=1e-5)
    hard = net.last_weights()
    assert hard["resolution"].tolist() == [0.0, 1.0, 0.0]
    # fix overrides both modes until unfix
    other = _extreme(net, False)
    net.fix(other)
    assert net.fixed == other
    net.train()
    net(x)
    assert net.last_weights()["resolution"].tolist() == [1.0, 0.0, 0.0]
    net.unfix()
    net.eval()  # back to the argmax (the train forwards above moved the BN statistics)
    with torch.no_grad():
        assert torch.allclose(net(x), net.child(choices).eval()(x), atol=1e-5)
        assert not torch.allclose(net(x), y, atol=1e-4)


def test_arch_and_weight_parameters_split_by_the_alpha_pattern() -> None:
    net = _tiny()
    arch = net.arch_parameters()
    named = dict(net.named_parameters())
    by_pattern = [p for n, p in named.items() if fnmatch.fnmatch(n, "*alpha*")]
    assert {id(p) for p in arch} == {id(p) for p in by_pattern}
    # resolution, stem, 4 blocks x (width, op, expansion, kernel, se, act), head
    assert len(arch) == 1 + 1 + 4 * 6 + 1
    weights = net.weight_parameters()
    assert {id(p) for p in weights}.isdisjoint({id(p) for p in arch})
    assert len(weights) + len(arch) == len(named)


def test_choice_problem_and_space_problem_name_what_is_wrong() -> None:
    net = _tiny()
    good = net.choices()
    assert net.choice_problem(good) is None
    assert "keys" in net.choice_problem({"resolution": 0})
    assert "has 2 entries" in net.choice_problem({**good, "widths": [0, 0]})
    assert "widths[2]" in net.choice_problem({**good, "widths": [0, 0, 2, 0]})
    assert "ops[1]" in net.choice_problem({**good, "ops": [0, 1, 0, 0]})  # no skip in TINY
    assert "0..2" in net.choice_problem({**good, "resolution": 3})
    assert "True" in net.choice_problem({**good, "se": [True, 0, 0, 0]})
    with pytest.raises(ValueError, match="resolution"):
        net.fix({**good, "resolution": -1})
    assert net.space_problem(SIZE) is None
    assert "16" in net.space_problem((3, 12, 12)) and "<= 12" in net.space_problem((3, 12, 12))
    assert "in_chans=1" in net.space_problem((1, 16, 16))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"resolutions": [16, 13]}, "does not fit"),
        ({"stage_widths": [[8, 0], [16], [24]]}, "stage_widths"),
        ({"stage_widths": [[8, 8], [16], [24]]}, "duplicate"),
        ({"strides": [1, 3, 2]}, "1 or 2"),
        ({"strides": [1, 2]}, "entries for 3 stages"),
        ({"acts": ["relu", "gelu", "relu"]}, "acts"),
        ({"expansions": [1, -2]}, "expansions"),
        ({"kernels": [3, 4]}, "odd"),
        ({"repeats": [1, 0, 1]}, "at least one block"),
        ({"space": "nope"}, "unknown FBNetV2 space"),
        ({"stem_width": [8, 16]}, "first_width"),
        ({"hidden_step": -8}, "hidden_step"),
        ({"acts": ["relu", [], "relu"]}, "acts"),
    ],
)
def test_impossible_spaces_fail_in_the_constructor(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FBNetV2Supernet(**{**TINY, **kwargs})


def test_space_defaults_widths_and_signature() -> None:
    net = _tiny()
    assert [b.stride for b in net.search_blocks] == [1, 2, 1, 2]  # derived: first, then 2s
    # an add where some input width option equals an output one at stride 1, also on the first
    # block of a stride-1 stage (mobile-vision's build_residual_connect)
    assert [block.can_add for block in net.blocks] == [True, False, True, False]
    assert net.search_blocks[0].mids == (16, 48) and net.search_blocks[3].mids == (24, 72)
    assert net.grid == (4, 4) and net.positions[1][0] == [0, 1, 3]
    sig = net.signature()
    assert json.loads(json.dumps(sig)) == sig and sig["variant"] == "cifar_fbnetv2_supernet"
    assert _tiny().signature() == sig and _tiny(head_width=48).signature() != sig
    # mobile-vision rounding (helper.get_divisible_by) and SE widths (IRFBlock)
    assert [divisible_width(v) for v in (87.3, 12, 3, 16 * 1.7912)] == [88, 16, 8, 32]
    assert se_width(88) == 24 and se_width(1296) == 328


def test_f_space_follows_the_notes() -> None:
    with torch.device("meta"):
        net = timm.create_model("fbnetv2_f_supernet")
    assert [max(w) for w in net.stage_widths] == [16, 28, 40, 96, 128, 224]
    assert [len(w) for w in net.stage_widths] == [2, 4, 4, 7, 8, 15]
    assert len(net.search_blocks) == 19 and net.head_pre == 1344 and net.first_spec is None
    assert net.grid == (7, 7) and net.positions[3][0] == [0, 2, 4, 5]
    assert net.search_blocks[-1].mids == tuple(range(8, 1345, 8))  # 6 x 224 on a grid of 8
    assert [b.ops for b in net.search_blocks[:3]] == [("ir", "skip"), ("ir",), ("ir", "skip")]


def test_train_mode_forward_trains_weights_and_logits_together() -> None:
    net = _tiny().train()
    x, y = torch.randn(4, *SIZE), torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    assert net.alpha_resolution.grad is not None and net.alpha_resolution.grad.abs().sum() > 0
    assert net.stem.conv.weight.grad is not None


# --- timm names, the published models --------------------------------------------------------
NAMES = [
    "fbnetv2_f_supernet",
    "cifar_fbnetv2_supernet",
    "cifar_fbnetv2_supernet_small",
    "fbnetv2_f1",
    "fbnetv2_f2",
    "fbnetv2_f3",
    "fbnetv2_f4",
]


@pytest.mark.parametrize("name", NAMES)
def test_timm_creates_every_name_with_the_classifier_api(name: str) -> None:
    assert name in dynlab.backbones.list_backbones()
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=7, in_chans=1)
    assert model.num_classes == 7 and model.get_classifier().out_features == 7
    assert model.stem.conv.in_channels == 1
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model.pretrained_cfg["input_size"][0] == 3


def test_the_small_space_brackets_a_quarter_and_half_of_resnet20s_macs_on_grey_32x32() -> None:
    """cifar_fbnetv2_supernet_small's argmax networks span about 10 M and 20 M MACs at 1x32x32
    with margin (CIFAR ResNet-20: 40.5 M), measured on the exported children."""
    net = timm.create_model("cifar_fbnetv2_supernet_small", num_classes=10, in_chans=1)
    assert net.space_problem((1, 32, 32)) is None
    low, high = (
        count_macs(net.child(_extreme(net, cheapest)).eval(), (1, 32, 32)) / 1e6
        for cheapest in (True, False)
    )
    assert low <= 5.0 and high >= 28.0  # measured 1.98 M and 30.70 M
    net.fix(_extreme(net, cheapest=False))
    assert float(net.expected_macs()) / 1e6 == pytest.approx(high)
    assert sum(p.numel() for p in net.parameters()) < 2.5e6


def test_a_child_runs_the_timm_head_api() -> None:
    net = _tiny().eval()
    child = net.child(net.choices()).eval()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        features = child.forward_features(x)
        pre = child.forward_head(features, pre_logits=True)
    assert features.shape[1] == child.num_features == net.num_features
    assert pre.shape == (2, child.head_hidden_size)
    assert torch.allclose(child.get_classifier()(pre), child(x), atol=1e-5)


# name: (resolution, mobile-vision MFLOPs, params in M) from model_info_fbnet_v2.json
ANCHORS = {
    "fbnetv2_f1": (128, 56.41, 5.999),
    "fbnetv2_f3": (192, 121.82, 6.900),
    "fbnetv2_f4": (224, 238.35, 6.995),
}


@pytest.mark.parametrize("name", sorted(ANCHORS))
def test_published_models_match_mobile_vision_figures(name: str) -> None:
    """mobile-vision's params are conv/linear weights only (no BN, no biases): ours match to the
    published 3 decimals; its MFLOPs count a little more than conv/linear MACs (within 0.5%)."""
    resolution, mflops, params = ANCHORS[name]
    with torch.device("meta"):
        model = timm.create_model(name)
    weights = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    assert round(weights / 1e6, 3) == params
    macs = count_macs(model, (3, resolution, resolution)) / 1e6
    assert abs(macs - mflops) / mflops < 0.005, macs
    assert model.resolution == resolution


def test_published_rows_expand_like_mobile_vision() -> None:
    specs = expand_rows(
        16,
        [
            ("ir", 16, 1, 1, 1, 3, False, "hswish"),
            ("ir", 24, 2, 2, 5.4566, 5, True, "relu"),
            ("skip", 40, 2, 1),
        ],
    )
    first, second, third, skip = specs
    assert not first.pw and first.residual and first.mid == 16  # e1: no pw (in == mid)
    assert second.mid == 88 and second.se == 24 and not second.residual and second.stride == 2
    assert third.stride == 1 and third.residual and third.mid == divisible_width(24 * 5.4566)
    assert skip.op == "skip" and skip.cin == 24 and skip.cout == 40
    net = FBNetV2Net(specs, stem_width=16, resolution=32, num_classes=3).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 40, 40)).shape == (2, 3)  # resized to 32 first
    with pytest.raises(ValueError, match="takes 8 channels"):
        FBNetV2Net([(8, 8, 1, 8, 3)], stem_width=16)


@pytest.fixture(scope="module")
def f_space() -> FBNetV2Supernet:
    """The F space's supernet with storage but no init (only shapes and costs matter)."""
    with torch.device("meta"):
        net = timm.create_model("fbnetv2_f_supernet")
    return net.to_empty(device="cpu")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_published_model_is_a_point_of_the_f_space(
    f_space: FBNetV2Supernet, name: str
) -> None:
    """published_choices finds F1-F4's every block among the F space's options; the exported
    net of those choices has the registered model's layers in order, MACs and parameters (also
    the supernet's expected costs there), and with its weights the same outputs."""
    choices = published_choices(f_space, name)
    assert f_space.choice_problem(choices) is None
    decoded = f_space.decode(choices)
    torch.manual_seed(0)
    published = timm.create_model(name).eval()
    _randomise(published)
    exported = f_space.standalone(choices).eval()
    assert decoded["resolution"] == published.resolution == exported.resolution
    assert decoded["head"] == published.head.width and exported.resize == "bilinear"
    assert "skip" in decoded["ops"] and len(set(decoded["widths"][13:17])) > 1  # F1, F4
    shapes = [tuple(v.shape) for v in published.state_dict().values()]
    assert [tuple(v.shape) for v in exported.state_dict().values()] == shapes
    r = published.resolution
    macs = count_macs(published, (3, r, r))
    assert count_macs(exported, (3, r, r)) == macs
    assert _params(exported) == _params(published)
    f_space.fix(choices)
    assert f_space.expected_macs().item() == macs
    assert f_space.expected_params().item() == _params(published)
    f_space.unfix()
    values = published.state_dict().values()
    exported.load_state_dict(dict(zip(exported.state_dict(), values, strict=True)))
    x = torch.randn(2, 3, r + 32, r + 32)  # resized to r inside both, bilinearly
    with torch.no_grad():
        want = published(x)
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(exported(x), want, atol=1e-5, rtol=1e-4)


def test_published_choices_refuse_a_space_without_the_models_options() -> None:
    with torch.device("meta"):
        narrow = timm.create_model("fbnetv2_f_supernet", head_width=[1984])
    with pytest.raises(ValueError, match="head width 1600"):
        published_choices(narrow, "fbnetv2_f1")
    assert published_choices(narrow, "fbnetv2_f4")["head"] == [0]


def test_exported_nets_resize_bilinearly_and_the_supernet_subsamples() -> None:
    """standalone (the exported / retrained net) resizes as the published models are evaluated,
    bilinearly; child keeps the supernet's nearest subsampling (it must compute the same)."""
    net = _tiny().eval()
    choices = {**net.choices(), "resolution": 2}  # 8 of the 16x16 input
    x = torch.randn(2, *SIZE)
    small = nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    for model, want in ((net.standalone(choices), small), (net.child(choices), x[..., 1::2, 1::2])):
        seen: list[torch.Tensor] = []
        model.stem.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0]))
        with torch.no_grad():
            model.eval()(x)
        torch.testing.assert_close(seen[0], want)
    assert not torch.allclose(small, x[..., 1::2, 1::2], atol=1e-2)
