"""Extra data streams: seeded subsets of the train split, disjoint from val, sharded by rank, and a
fit on two combined streams that resumes bit-identically after a mid-epoch preemption."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from dynlab.checkpointing import AtomicCheckpointIO, RNGStateCallback
from dynlab.data import sampling
from dynlab.data.base import StreamSpec
from dynlab.data.sampling import ResumableDataLoader, ResumableLoaderCallback
from dynlab.data.synthetic import SyntheticDataModule
from dynlab.preemption import Preempted, PreemptionHandler

ARCH, WEIGHTS = StreamSpec("arch", fraction=0.2), StreamSpec("arch", fraction=0.2, complement=True)


def synthetic(**kwargs: int) -> SyntheticDataModule:
    options = {"num_train": 120, "num_test": 8, "val_size": 20, "image_size": 8, "batch_size": 8}
    return SyntheticDataModule(**{**options, **kwargs})


def full_indices(dm: SyntheticDataModule, spec: StreamSpec) -> set[int]:
    """The stream's samples as indices of the full train set (the space val is drawn from)."""
    train = dm.splits.train  # type: ignore[union-attr]
    return {train.indices[i] for i in dm.stream_indices(spec)}  # type: ignore[attr-defined]


def test_streams_are_seeded_subsets_disjoint_from_val_and_from_each_other() -> None:
    dm = synthetic()
    dm.setup()
    val = set(dm.splits.val.indices)  # type: ignore[union-attr]
    arch, weights = full_indices(dm, ARCH), full_indices(dm, WEIGHTS)
    assert len(arch) == 20 and len(weights) == 80  # 20 % / 80 % of the 100 training samples
    assert not arch & weights and not (arch | weights) & val
    assert arch | weights == set(dm.splits.train.indices)  # type: ignore[union-attr]
    bn = full_indices(dm, StreamSpec("bn", size=16))
    assert len(bn) == 16 and not bn & val and bn != full_indices(dm, StreamSpec("bn2", size=16))
    again = synthetic()
    again.setup()
    assert full_indices(again, ARCH) == arch  # seeded by (datamodule seed, name)
    other_seed = synthetic(seed=1)
    other_seed.setup()
    assert full_indices(other_seed, ARCH) != arch
    with pytest.raises(ValueError, match="fraction or size"):
        StreamSpec("x", fraction=0.5, size=3)


def test_sharding_over_two_ranks_covers_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    dm = synthetic()
    shards = []
    for rank in range(2):
        monkeypatch.setattr(sampling, "rank_and_world_size", lambda rank=rank: (rank, 2))
        loader = dm.stream_loader(StreamSpec("arch", fraction=0.2, batch_size=3))
        assert isinstance(loader, ResumableDataLoader)
        shards.append([index for index, _ in loader.sampler])
        whole = dm.stream_loader(StreamSpec("arch", fraction=0.2, sharded=False))
        assert sorted(index for index, _ in whole.sampler) == list(range(20))
    assert len(shards[0]) == len(shards[1]) == 10
    assert sorted(shards[0] + shards[1]) == list(range(20))
    ordered = dm.stream_loader(StreamSpec("bn", size=6, shuffle=False, sharded=False))
    assert not isinstance(ordered, ResumableDataLoader)
    assert [index for index, _ in ordered.sampler] == list(range(6))


class TwoStreams(pl.LightningModule):
    """Trains on the sum of both streams' losses; dropout draws from the global RNG."""

    def __init__(self, signal_at_step: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(3 * 8 * 8, 10))
        self.signal_at_step = signal_at_step
        self.seen: list[Tensor] = []

    def training_step(self, batch: dict[str, tuple[Tensor, Tensor]], batch_idx: int) -> Tensor:
        if self.global_step == self.signal_at_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        self.seen.append(torch.cat([batch["arch"][1], batch["weights"][1]]))
        return sum(nn.functional.cross_entropy(self.net(x), y) for x, y in batch.values())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit_streams(root: Path, module: TwoStreams, ckpt: Path | None = None) -> dict[str, Tensor]:
    dm = synthetic()
    dm.set_train_streams({"arch": ARCH, "weights": WEIGHTS})
    assert len(dm.train_dataloader()) == 10  # the longest stream's batches (schedules need it)
    pl.seed_everything(0)
    trainer = pl.Trainer(
        default_root_dir=root,
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[ResumableLoaderCallback(), RNGStateCallback(), PreemptionHandler()],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=False)
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_fit_on_two_streams_resumes_bit_identically(tmp_path: Path) -> None:
    # arch: 20 samples = 3 batches, cycled; weights: 80 samples = 10 batches a epoch. Step 15 is
    # epoch 1, batch 5: the arch stream is in its second pass of that epoch.
    whole = TwoStreams()
    expected = fit_streams(tmp_path / "whole", whole)
    assert len(whole.seen) == 20
    assert not torch.equal(whole.seen[0][:8], whole.seen[3][:8])  # a new pass, a new order
    killed = TwoStreams(signal_at_step=15)
    with pytest.raises(Preempted):
        fit_streams(tmp_path / "killed", killed)
    resumed = TwoStreams()
    result = fit_streams(tmp_path / "killed", resumed, ckpt=tmp_path / "killed" / "last.ckpt")
    assert [t.tolist() for t in killed.seen + resumed.seen] == [t.tolist() for t in whole.seen]
    for name, value in expected.items():
        torch.testing.assert_close(result[name], value, rtol=0, atol=0, msg=name)
