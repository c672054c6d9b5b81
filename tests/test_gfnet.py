"""GFNet: the network's pieces against the official definitions, the protocol, the three stages
resumed from kills mid-stage, and bad settings refused before training."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dynlab import checkpointing as ckpt
from dynlab import runner
from dynlab.backbones import create_backbone
from dynlab.building import technique_config
from dynlab.data.base import DataInfo
from dynlab.evaluation.macs import count_macs
from dynlab.preemption import Preempted, PreemptionHandler
from dynlab.runner import run_job
from dynlab.techniques.gfnet.config import ClassifierKind, PPOConfig
from dynlab.techniques.gfnet.model import GFNet, GRUCell, Locate, PatchPolicy, crop_patches
from dynlab.techniques.gfnet.module import GFNetModule
from dynlab.techniques.gfnet.ppo import (
    Episode,
    discounted_returns,
    normalise_over_ranks,
    ppo_loss,
)
from dynlab.validation import ConfigError, build_run, validate_config

from .conftest import TINY, run_cli

# Three stages of 2 epochs on 96 synthetic 32x32 images: 16x16 patches, glance + 2 focus steps.
GF_TINY = [
    *TINY,
    "technique=gfnet",
    "technique.patch_size=16",
    "technique.T=3",
    "technique.classifier_hidden=32",
    "technique.policy_hidden=32",
    "technique.policy_width=64",
    "trainer.max_epochs=2",
    "++technique.phases.stage_2.epochs=2",
    "evaluation.budgeted=false",
]


def _net(steps: int = 3, classifier: ClassifierKind = ClassifierKind.gru, size: int = 48) -> GFNet:
    torch.manual_seed(0)
    nets = [create_backbone("cifar_resnet20", num_classes=10) for _ in range(2)]
    return GFNet(
        *nets,
        num_classes=10,
        input_size=(3, size, size),
        patch_size=24,
        steps=steps,
        classifier=classifier,
        classifier_hidden=32,
        policy_hidden=32,
        policy_width=64,
    )


# --- the pieces -------------------------------------------------------------------------------
def test_batched_crops_equal_the_official_per_sample_slices():
    images = torch.randn(6, 2, 20, 30)
    location = torch.tensor([[0, 0], [1, 1], [0.5, 0.5], [0.999, 0.01], [0.3, 0.7], [1, 0]])
    patches = crop_patches(images, location, 8)
    for i, (a0, a1) in enumerate(location.tolist()):
        top, left = int(a0 * (20 - 8)), int(a1 * (30 - 8))  # floor(a * (size - P)), utils.py
        assert torch.equal(patches[i], images[i, :, top : top + 8, left : left + 8])


def test_gru_cell_is_torchs_gru_cell():
    ours, theirs = GRUCell(5, 7), nn.GRUCell(5, 7)
    with torch.no_grad():
        theirs.weight_ih.copy_(ours.input.weight)
        theirs.bias_ih.copy_(ours.input.bias)
        theirs.weight_hh.copy_(ours.hidden.weight)
        theirs.bias_hh.copy_(ours.hidden.bias)
    x, h = torch.randn(4, 5), torch.randn(4, 7)
    torch.testing.assert_close(ours(x, h), theirs(x, h))
    torch.testing.assert_close(ours(x, None), theirs(x, torch.zeros(4, 7)))


def test_discounted_returns_with_gamma():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 1.0]])
    expected = torch.tensor([[1 + 0.5**2 * 4, 0.5 * 2 + 0.25], [0.5 * 4, 2 + 0.5], [4.0, 1.0]])
    torch.testing.assert_close(discounted_returns(rewards, 0.5), expected)


def test_ppo_moves_the_actor_toward_rewarded_locations():
    """Locations near (0.8, 0.2) are rewarded: a few PPO updates move the mean there."""
    torch.manual_seed(0)
    policy = PatchPolicy((4, 2, 2), "linear", hidden=16, width=16, conv_channels=4, action_std=0.1)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    states = torch.randn(1, 64, 4, 2, 2)
    target = torch.tensor([0.8, 0.2])
    for _ in range(150):
        with torch.no_grad():
            action, logp, _ = policy.act(states[0], None, sample=True, generator=None)
        reward = -(action - target).square().sum(-1)
        loss, _ = ppo_loss(
            policy, Episode(states, action[None], logp[None], reward[None]), PPOConfig()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    mean, _ = policy.step(states[0], None)
    assert (mean - target).abs().max() < 0.1


def test_exits_sessions_and_deploy_form_agree():
    net = _net().eval()
    x = torch.randn(5, 3, 48, 48)
    with torch.no_grad():
        exits = net.forward_exits(x)
        deployed = net.deploy()
        assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.glance.modules())
        for a, b in zip(exits, deployed.forward_exits(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        session = deployed.exit_session(x)
        torch.testing.assert_close(session.next_exit(), exits[0], rtol=1e-4, atol=1e-4)
        keep = torch.tensor([True, False, True, True, False])
        session.keep(keep)
        for k in (1, 2):
            torch.testing.assert_close(session.next_exit(), exits[k][keep], rtol=1e-4, atol=1e-4)


def test_exit_macs_add_one_focus_step_at_a_time_and_undercut_the_full_image():
    net = _net(steps=4)
    macs = net.exit_macs((3, 48, 48))
    steps = [b - a for a, b in zip(macs, macs[1:], strict=False)]
    assert len(macs) == 4 and min(steps) > 0
    assert max(steps) - min(steps) < 1e-3 * steps[0]  # every focus step costs the same
    full = create_backbone("cifar_resnet20", num_classes=10)
    # A 24x24 glance costs about a quarter of the backbone on the 48x48 image.
    assert macs[0] < 0.3 * count_macs(full, (3, 48, 48))


def test_cascade_classifier_answers_with_the_glance_head_first():
    net = _net(classifier=ClassifierKind.cascade).eval()
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        steps = net.rollout(x, own_head=True)
        glance_logits = net.glance.own_logits(net.glance(net.glimpse(x))[0])
    torch.testing.assert_close(steps[0].logits, glance_logits)
    assert [s.logits.shape for s in steps] == [(3, 10)] * 3
    fcs = net.classifier.fcs  # step t reads the features of steps 1..t
    assert 2 * fcs[1].in_features == 3 * fcs[0].in_features


def test_random_and_sampled_locations_and_the_mean():
    net = _net().eval()
    x = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        mean = net.rollout(x, Locate.mean)
        again = net.rollout(x, Locate.mean)
        sampled = net.rollout(x, Locate.sample, generator=torch.Generator().manual_seed(1))
    assert all(s.logprob is None for s in mean) and sampled[1].logprob.shape == (4,)
    torch.testing.assert_close(mean[1].location, again[1].location)
    spread = (sampled[1].location - mean[1].location).std()
    assert 0.03 < float(spread) < 0.2  # std 0.1 around the mean (clipped to [0, 1])


# --- the three stages as phases of one run ----------------------------------------------------
class _SignalInPhase(PreemptionHandler):
    """The real handler, plus SIGUSR1 to this process at global step 3 of phase `PHASE`."""

    PHASE = "stage_1"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.current_phase == self.PHASE and trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def _final_state(run: Path, phase: str) -> dict[str, torch.Tensor]:
    return torch.load(ckpt.phase_dir(run, phase) / ckpt.FINAL, weights_only=False)["state_dict"]


@pytest.mark.slow
def test_each_stage_resumes_from_a_kill_mid_stage_to_the_same_weights(
    compose_cfg, tmp_path, monkeypatch
):
    top1 = run_job(compose_cfg(GF_TINY, run_dir=tmp_path / "straight"))
    for phase in ("stage_1", "stage_2", "stage_3"):
        with monkeypatch.context() as patch:
            patch.setattr(_SignalInPhase, "PHASE", phase)
            patch.setattr(runner, "PreemptionHandler", _SignalInPhase)
            with pytest.raises(Preempted):
                run_job(compose_cfg(GF_TINY, run_dir=tmp_path / "cut"))
        stopped = torch.load(
            ckpt.phase_dir(tmp_path / "cut", phase) / ckpt.LAST, weights_only=False
        )
        assert stopped["global_step"] == 3 and not ckpt.is_done(tmp_path / "cut", phase)
    assert run_job(compose_cfg(GF_TINY, run_dir=tmp_path / "cut")) == pytest.approx(top1)
    for phase in ("stage_1", "stage_2", "stage_3"):
        straight, cut = (_final_state(tmp_path / r, phase) for r in ("straight", "cut"))
        for name, value in straight.items():
            assert torch.equal(value, cut[name]), f"{phase}: {name}"

    # Stage 2 trains the policy alone: encoders (BatchNorm statistics too) and classifier stay.
    before, after = (_final_state(tmp_path / "straight", p) for p in ("stage_1", "stage_2"))
    policy = [n for n in after if n.startswith("model.policy.")]
    assert policy and any(not torch.equal(before[n], after[n]) for n in policy)
    for name in set(after) - set(policy):
        assert torch.equal(before[name], after[name]), name
    # Stage 3 fine-tunes the encoders and classifier on the frozen policy's locations.
    final = _final_state(tmp_path / "straight", "stage_3")
    assert all(torch.equal(after[n], final[n]) for n in policy)
    assert not torch.equal(
        after["model.local.net.head.fc.weight"], final["model.local.net.head.fc.weight"]
    )

    results = json.loads((tmp_path / "straight/results.json").read_text())
    assert len(results["exit_macs"]) == 3 and len(results["anytime"]) == 3
    assert (tmp_path / "straight/plots/patches.png").stat().st_size > 10_000


@pytest.mark.slow
def test_under_ddp_a_frozen_glance_encoder_is_fine_tuned_first_then_left_alone(tmp_path):
    """Two gloo processes, T = 2 (a single focus step: every GRU weight must still take part, or
    DDP stops on an unused parameter), the MobileNet-style schedule glance -> stages 1-3."""
    args = [*GF_TINY, "technique.T=2", "technique.train_glance=false", "trainer=ddp_cpu"]
    args += ["trainer.max_epochs=1", "++technique.phases.stage_2.epochs=1"]
    args += ["dataset.batch_size=16", "evaluation.anytime=false", "hydra.run.dir=run"]
    run_cli("train", args, cwd=tmp_path)
    run = tmp_path / "run"
    phases = ["glance", "stage_1", "stage_2", "stage_3"]
    assert all(ckpt.is_done(run, p) for p in phases)
    start = _final_state(run, "glance")
    glance = [n for n in start if n.startswith("model.glance.")]
    assert glance and not all(torch.equal(start[n], _final_state(run, "stage_1")[n]) for n in start)
    for phase in phases[1:]:
        state = _final_state(run, phase)
        assert all(torch.equal(start[n], state[n]) for n in glance), phase


# --- bad settings, refused before training ----------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["technique.patch_size=32"], "patch_size=32 is not smaller than synthetic's 32x32"),
        (["technique.patch_size=48"], "set technique.patch_size below 32"),
        (
            [
                "backbone=timm",
                "backbone.name=vit_tiny_patch16_224",
                "+backbone.kwargs.dynamic_img_size=true",
            ],
            "spatial feature map",
        ),
    ],
)
def test_settings_gfnet_cannot_use_fail_in_validation(compose_cfg, overrides, message):
    cfg = compose_cfg([*GF_TINY, *overrides])
    validate_config(cfg)
    with pytest.raises(ConfigError, match=message):
        build_run(cfg)


def test_t_below_one_fails_the_cheap_validation(compose_cfg):
    with pytest.raises(ConfigError, match="T >= 1"):
        validate_config(compose_cfg([*GF_TINY, "technique.T=0"]))


# --- what stage 2 learns, on a dataset where looking matters -----------------------------------
def _policy_against_random(module, loader) -> dict[str, float]:
    """Mean confidence gain (last step over the glance) and top-1 at step T on the policy's mean
    locations, and the same averaged over 5 seeded draws of random locations."""
    from dynlab.techniques.gfnet.ppo import true_class_confidence

    net = module.model.eval()
    scores = {"reward": [], "top1": [], "reward_random": [], "top1_random": []}
    with torch.no_grad():
        for seed in range(5):
            gain = correct = count = 0.0
            for x, y in loader:
                generator = torch.Generator().manual_seed(seed * 1000 + int(count))
                steps = net.rollout(x, Locate.random, generator=generator)
                confidence = true_class_confidence(steps, y)
                gain += float((confidence[-1] - confidence[0]).sum())
                correct += float((steps[-1].logits.argmax(1) == y).sum())
                count += len(y)
            scores["reward_random"].append(gain / count)
            scores["top1_random"].append(100 * correct / count)
        gain = correct = count = 0.0
        for x, y in loader:
            steps = net.rollout(x)
            confidence = true_class_confidence(steps, y)
            gain += float((confidence[-1] - confidence[0]).sum())
            correct += float((steps[-1].logits.argmax(1) == y).sum())
            count += len(y)
    averaged = {k: sum(v) / len(v) for k, v in scores.items() if v}
    return {**averaged, "reward": gain / count, "top1": 100 * correct / count}


def _beats_random(s: dict[str, float]) -> bool:
    return s["reward"] > s["reward_random"] + 0.03 and s["top1"] > s["top1_random"] + 2.0


@pytest.mark.slow
def test_stage_2_policy_beats_random_locations_on_cluttered_digits(compose_cfg, tmp_path):
    preset = ["+experiment=gfnet/digits", "logger=csv", "trainer.enable_progress_bar=false"]
    preset += ["evaluation.budgeted=false", "evaluation.anytime=false"]
    preset += ["technique.phases.stage_1.epochs=8", "technique.phases.stage_2.epochs=4"]
    stage_1 = compose_cfg([*preset, "phase=stage_1"], run_dir=tmp_path / "stage_1")
    run_job(stage_1)
    first = ckpt.phase_dir(tmp_path / "stage_1", "stage_1") / ckpt.FINAL
    stage_2 = compose_cfg([*preset, "phase=stage_2", f"ckpt_path={first}"], run_dir=tmp_path / "s2")
    run_job(stage_2)

    data, module = build_run(stage_2)
    data.setup("test")
    scores = {}
    for phase, run in (("stage_1", "stage_1"), ("stage_2", "s2")):
        ckpt.load_module_state(module, ckpt.phase_dir(tmp_path / run, phase) / ckpt.FINAL)
        scores[phase] = _policy_against_random(module, data.test_dataloader())
    print(json.dumps(scores, indent=1))
    # The stage-1 policy learned nothing (its mean points about the same place every time) ...
    assert not _beats_random(scores["stage_1"]), scores
    # ... the PPO-trained one finds the digit: a larger confidence gain and a better last exit.
    assert _beats_random(scores["stage_2"]), scores


# --- presets --------------------------------------------------------------------------------
IMAGENET = DataInfo("imagenet", 1000, (3, 224, 224))


@pytest.mark.parametrize(
    "preset", ["digits", "resnet32_cifar10", "resnet50_p96_imagenet", "mobilenetv3_p96_imagenet"]
)
def test_presets_compose_and_validate(compose_cfg, preset):
    cfg = compose_cfg([f"+experiment=gfnet/{preset}"])
    validate_config(cfg)
    assert cfg.technique.name == "gfnet" and cfg.expected.paper and cfg.expected.dynlab


def _imagenet_module(compose_cfg, preset: str) -> GFNetModule:
    cfg = compose_cfg([f"+experiment=gfnet/{preset}"])
    config = technique_config(cfg)
    module = GFNetModule(config, OmegaConf.to_object(cfg.backbone), IMAGENET)
    module.set_recipes(config.phases)
    return module


def test_resnet50_preset_matches_the_official_sizes_and_costs(compose_cfg):
    module = _imagenet_module(compose_cfg, "resnet50_p96_imagenet")
    net = module.model
    # Official train.py: state_dim = 2048 * ceil(96 / 32)^2, a 2048-wide first policy layer.
    assert (
        net.policy.encoder[1].in_features == 2048 * 3 * 3
        and net.policy.encoder[1].out_features == 2048
    )
    assert net.classifier.gru.input.in_features == 2048 and net.classifier.fc.in_features == 1024
    assert [p.name for p in module.phases("train")] == ["stage_1", "stage_2", "stage_3"]
    macs = net.exit_macs((3, 224, 224))
    plain = count_macs(create_backbone("resnet50", num_classes=1000), (3, 224, 224))
    at_96 = count_macs(create_backbone("resnet50", num_classes=1000), (3, 96, 96))
    # Each step: the encoder at 96x96 plus the GRU (3 x (2048 + 1024) x 1024) and its head; each
    # focus step adds the policy (2048 x 3 x 3 x 2048 + ...): measured, not assumed.
    assert at_96 < macs[0] < at_96 + 15e6
    assert at_96 + 38e6 < macs[1] - macs[0] < at_96 + 60e6
    assert macs[-1] < plain  # all five steps still cost less than one 224x224 pass


def test_mobilenet_preset_fine_tunes_the_glance_first_and_cascades(compose_cfg):
    module = _imagenet_module(compose_cfg, "mobilenetv3_p96_imagenet")
    net = module.model
    assert [p.name for p in module.phases("train")] == ["glance", "stage_1", "stage_2", "stage_3"]
    assert module.recipe("glance").epochs == 30 and module.config.dsn_weight == 5.0
    # configs.py: 1280 pooled features, a 960-channel 3x3 map read through a 1x1 conv to 32.
    assert [fc.in_features for fc in net.classifier.fcs] == [1280 * 2, 1280 * 3]
    assert net.policy.encoder[0].in_channels == 960 and net.policy.encoder[3].in_features == 32 * 9


def test_ppo_returns_are_normalised_over_every_process(monkeypatch) -> None:
    """Two DDP processes with half a batch each normalise as the official code does on the whole
    batch (DataParallel), not each over its own half: the moments are summed across processes
    (all_reduce stands in for the other rank by adding its half's moments)."""
    returns = torch.randn(3, 8) + torch.arange(8.0)  # the halves have different means
    whole = (returns - returns.mean()) / (returns.std() + 1e-5)
    halves = returns[:, :4], returns[:, 4:]

    def moments(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.tensor(float(x.numel())), x.sum(), x.square().sum()]).double()

    gathered = []
    for rank in range(2):
        other = moments(halves[1 - rank])
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, o=other: t.add_(o))
        gathered.append(normalise_over_ranks(halves[rank]))
    monkeypatch.undo()
    assert torch.allclose(torch.cat(gathered, dim=1), whole, atol=1e-6)
    assert torch.allclose(normalise_over_ranks(returns), whole, atol=1e-6)  # one process
    per_half = (halves[0] - halves[0].mean()) / (halves[0].std() + 1e-5)
    assert not torch.allclose(gathered[0], per_half, atol=1e-3)
