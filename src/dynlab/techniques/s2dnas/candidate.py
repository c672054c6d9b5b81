"""Brief training of one sampled S2D network, in a plain PyTorch loop.

Candidates train for a fraction of an epoch to a few epochs each, many times per search. A plain
loop costs nothing to start (a Lightning Trainer per candidate would set up loggers, callbacks,
checkpointing and progress bars every time) and is exactly reproducible from one seed, which the
search's resume relies on. Every process reads the whole train and val splits: under DDP, ranks
train different candidates, so the rank-sharded loaders of the datamodule do not apply here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dynlab.config import OptimConfig
from dynlab.data.base import DynlabDataModule
from dynlab.data.sampling import SeededDataset
from dynlab.techniques.base import build_optimizer, lr_lambda
from dynlab.techniques.s2dnas.model import multi_exit_loss


@dataclass
class CandidateData:
    """The train and val splits of a datamodule, with its transforms and batch sizes."""

    train: SeededDataset
    val: SeededDataset
    batch_size: int
    eval_batch_size: int

    @classmethod
    def from_datamodule(cls, datamodule: DynlabDataModule) -> CandidateData:
        datamodule.setup("fit")
        splits = datamodule.splits
        assert splits is not None
        augment = (
            datamodule.augment_transform() if datamodule.augment else datamodule.eval_transform()
        )
        return cls(
            train=SeededDataset(splits.train, augment),
            val=SeededDataset(splits.val, datamodule.eval_transform()),
            batch_size=datamodule.batch_size,
            eval_batch_size=datamodule.eval_batch_size,
        )

    def train_batches(
        self, generator: torch.Generator, limit: int | None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of shuffled, augmented batches (at most `limit`), drawn from `generator`."""
        order = torch.randperm(len(self.train), generator=generator)
        seeds = torch.randint(0, 2**62, (len(self.train),), generator=generator)
        keys = list(zip(order.tolist(), seeds.tolist(), strict=True))
        if limit is not None:
            keys = keys[: limit * self.batch_size]
        return iter(DataLoader(self.train, batch_size=self.batch_size, sampler=keys))

    def val_loader(self) -> DataLoader:
        """The whole val split in order."""
        keys = [(index, 0) for index in range(len(self.val))]
        return DataLoader(self.val, batch_size=self.eval_batch_size, sampler=keys)

    def num_train_batches(self, limit: int | None) -> int:
        batches = -(-len(self.train) // self.batch_size)
        return batches if limit is None else min(batches, limit)


def train_candidate(
    model: nn.Module,
    data: CandidateData,
    optim: OptimConfig,
    loss_weights: Sequence[float],
    epochs: int,
    batches_per_epoch: int | None,
    seed: int,
    device: torch.device,
) -> None:
    """Train `model` with the multi-exit loss for `epochs` (the technique's optimiser and schedule)."""
    model.to(device).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(model, named, optim)
    steps_per_epoch = data.num_train_batches(batches_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_lambda(optim, total_steps=epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch),
    )
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for x, y in data.train_batches(generator, batches_per_epoch):
            logits = model.forward_exits(x.to(device))  # type: ignore[operator]
            loss = multi_exit_loss(logits, y.to(device), loss_weights, optim.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
