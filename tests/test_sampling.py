"""Deterministic, sharded, exactly resumable sampling (dynlab.data.sampling)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from dynlab.data import sampling
from dynlab.data.sampling import (
    EvalSampler,
    ResumableDataLoader,
    ResumableLoaderCallback,
    ResumableSampler,
    SeededDataset,
)
from dynlab.data.synthetic import SyntheticDataModule
from dynlab.data.transforms import CropFlip, Normalize, Seeded


def as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world_size: int) -> None:
    monkeypatch.setattr(sampling, "rank_and_world_size", lambda: (rank, world_size))


def epoch_pairs(sampler: ResumableSampler, epoch: int) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def random_images(n: int = 40, size: int = 8) -> SeededDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    base = [(images[i], i % 3) for i in range(n)]
    return SeededDataset(base, CropFlip(Normalize((0.5,) * 3, (0.25,) * 3), padding=2, flip=True))


def loader(
    dataset: SeededDataset, batch_size: int = 6, num_workers: int = 0
) -> ResumableDataLoader:
    sampler = ResumableSampler(len(dataset), seed=3)
    return ResumableDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers
    )


def batches_equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )


def test_order_is_a_seeded_permutation_per_epoch() -> None:
    sampler = ResumableSampler(50, seed=7)
    first = epoch_pairs(sampler, 0)
    assert sorted(index for index, _ in first) == list(range(50))
    assert epoch_pairs(ResumableSampler(50, seed=7), 0) == first
    assert epoch_pairs(sampler, 1) != first
    assert epoch_pairs(ResumableSampler(50, seed=8), 0) != first


def test_no_shuffle_keeps_dataset_order_and_sample_seeds() -> None:
    ordered = epoch_pairs(ResumableSampler(20, seed=1, shuffle=False), 2)
    assert [index for index, _ in ordered] == list(range(20))
    shuffled = dict(epoch_pairs(ResumableSampler(20, seed=1), 2))
    assert dict(ordered) == shuffled  # the sample seed depends on (seed, epoch, index) only


def test_sample_seeds_do_not_depend_on_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    single = dict(epoch_pairs(ResumableSampler(30, seed=5), 1))
    assert len(set(single.values())) == 30
    for rank in range(4):
        as_rank(monkeypatch, rank, 4)
        for index, seed in epoch_pairs(ResumableSampler(30, seed=5), 1):
            assert single[index] == seed


@pytest.mark.parametrize("num_samples,world_size", [(10, 3), (12, 4), (5, 8)])
def test_train_shards_are_equal_and_cover_the_data(
    monkeypatch: pytest.MonkeyPatch, num_samples: int, world_size: int
) -> None:
    shards = []
    for rank in range(world_size):
        as_rank(monkeypatch, rank, world_size)
        sampler = ResumableSampler(num_samples, seed=0)
        shards.append([index for index, _ in epoch_pairs(sampler, 3)])
        assert len(sampler) == len(shards[-1])
    assert len({len(shard) for shard in shards}) == 1
    merged = [index for shard in shards for index in shard]
    assert set(merged) == set(range(num_samples))
    assert len(merged) == -(-num_samples // world_size) * world_size  # padded by wrapping


def test_drop_last_shards_are_disjoint(monkeypatch: pytest.MonkeyPatch) -> None:
    shards = []
    for rank in range(3):
        as_rank(monkeypatch, rank, 3)
        shards.append([i for i, _ in epoch_pairs(ResumableSampler(10, 0, drop_last=True), 0)])
    merged = [index for shard in shards for index in shard]
    assert [len(shard) for shard in shards] == [3, 3, 3]
    assert len(set(merged)) == 9


@pytest.mark.parametrize("num_samples,world_size", [(10, 3), (7, 2), (3, 4)])
def test_eval_shards_concatenate_to_dataset_order(
    monkeypatch: pytest.MonkeyPatch, num_samples: int, world_size: int
) -> None:
    merged = []
    for rank in range(world_size):
        as_rank(monkeypatch, rank, world_size)
        sampler = EvalSampler(num_samples)
        shard = list(sampler)
        assert len(sampler) == len(shard)
        merged += shard
    assert merged == [(index, 0) for index in range(num_samples)]


def test_seeded_dataset_augmentation_follows_the_seed() -> None:
    dataset = random_images()
    x, label = dataset[(4, 123)]
    assert torch.equal(x, dataset[(4, 123)][0]) and label == 1
    variants = {dataset[(4, seed)][0].sum().item() for seed in range(20)}
    assert len(variants) > 5


def test_seeded_seeds_python_numpy_and_torch_and_restores_them() -> None:
    """timm's augmentations draw from all three global RNGs: each must follow the seed alone."""

    def draw(_: object) -> torch.Tensor:
        return torch.tensor([random.random(), float(np.random.rand()), torch.rand(()).item()])

    transform = Seeded(draw)
    first = transform(None, 11)
    random.random(), np.random.rand(), torch.rand(3)  # whatever ran before must not matter
    assert torch.equal(first, transform(None, 11))
    other = transform(None, 12)
    assert (first != other).all()  # every one of the three streams moved with the seed
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()
    transform(None, 13)
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.random.get_rng_state(), states[2])


def test_mid_epoch_resume_yields_exactly_the_remaining_batches() -> None:
    dataset = random_images()
    full = loader(dataset)
    full.sampler.set_epoch(2)
    expected = list(full)
    full.sampler.set_epoch(3)
    next_epoch = list(full)

    resumed = loader(dataset)
    resumed.load_state_dict({"epoch": 2, "consumed": 3})
    assert resumed.state_dict() == {"epoch": 2, "consumed": 3}
    assert batches_equal(list(resumed), expected[3:])
    resumed.sampler.set_epoch(3)  # the skip applies to the resumed epoch only
    assert batches_equal(list(resumed), next_epoch)


def test_batches_do_not_depend_on_worker_count() -> None:
    dataset = random_images(n=24)
    assert batches_equal(list(loader(dataset)), list(loader(dataset, num_workers=2)))


def test_resumable_loader_needs_a_resumable_sampler() -> None:
    with pytest.raises(TypeError, match="ResumableSampler"):
        ResumableDataLoader(random_images(), batch_size=4)


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        ResumableSampler(0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(5, seed=-1)
    with pytest.raises(ValueError, match="skip"):
        ResumableSampler(5, seed=0).resume(0, -2)


class TinyClassifier(pl.LightningModule):
    """A seeded linear classifier trained with momentum SGD (optimizer state must resume too)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class SaveAtStep(pl.Callback):
    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def tiny_data(num_workers: int = 0) -> SyntheticDataModule:
    return SyntheticDataModule(
        num_train=90,
        num_test=10,
        val_size=10,
        num_classes=4,
        image_size=8,
        batch_size=16,
        num_workers=num_workers,
    )


def tiny_trainer(*callbacks: pl.Callback) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        callbacks=[ResumableLoaderCallback(), *callbacks],
    )


# 80 training samples in batches of 16: step 3 is mid-epoch 0, step 5 its last batch. With a
# worker, the loader's iterator exists before Lightning calls set_epoch on resume.
@pytest.mark.parametrize(
    "save_step,num_workers", [(3, 0), (5, 1)], ids=["mid-epoch", "epoch-end-with-worker"]
)
def test_lightning_resume_matches_uninterrupted_training(
    tmp_path, save_step: int, num_workers: int
) -> None:
    checkpoint = str(tmp_path / "preempted.ckpt")
    uninterrupted = TinyClassifier()
    initial = [p.detach().clone() for p in uninterrupted.parameters()]
    tiny_trainer(SaveAtStep(save_step, checkpoint)).fit(uninterrupted, tiny_data(num_workers))

    resumed = TinyClassifier()
    tiny_trainer().fit(resumed, tiny_data(num_workers), ckpt_path=checkpoint)
    for start, a, b in zip(initial, uninterrupted.parameters(), resumed.parameters(), strict=True):
        assert not torch.equal(start, a)
        assert torch.equal(a, b)


def test_train_loader_under_a_trainer_needs_the_callback() -> None:
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    data = tiny_data()
    data.trainer = trainer
    with pytest.raises(ValueError, match="ResumableLoaderCallback"):
        data.train_dataloader()


def test_each_pass_within_an_epoch_has_its_own_order_and_resumes_exactly() -> None:
    sampler = ResumableSampler(12, seed=2)
    sampler.set_epoch(1)
    passes = [list(sampler) for _ in range(4)]
    assert len({str(p) for p in passes}) == 4  # a cycled (shorter) stream gets fresh orders
    assert epoch_pairs(sampler, 1) == passes[0]  # a new epoch starts at its first pass again
    resumed = ResumableSampler(12, seed=2)
    resumed.resume(epoch=1, skip=5, cycle=2)
    resumed.set_epoch(1)  # Lightning sets the epoch after loading the state: the resume point stays
    assert list(resumed) == passes[2][5:]
    assert list(resumed) == passes[3]  # then the passes go on as in the uninterrupted epoch
