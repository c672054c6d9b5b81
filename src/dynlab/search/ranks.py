"""Candidates spread over the ranks of a job, with the ledger saved and signals honoured between
rounds.

Every rank runs the search (the same controller, the same samples). Round by round, rank r of W
evaluates the r-th of the next W candidates to do, so rank r takes every W-th; the records are
all-gathered so every rank holds the same ledger, which rank 0 writes. After each round is saved,
a Slurm signal received by any rank stops every rank there (`dynlab.preemption`), and the resumed
search continues with the next candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist

from dynlab.data.sampling import rank_and_world_size
from dynlab.preemption import stop_if_signalled
from dynlab.search.ledger import Ledger


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (`[obj]` outside torch.distributed)."""
    world = rank_and_world_size()[1]
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def evaluate_spread(
    todo: Sequence[int],
    evaluate: Callable[[int], dict[str, Any]],
    ledger: Ledger,
) -> None:
    """Evaluate candidates `todo` (indices) spread over the ranks, adding each record (with its
    `index` and the `rank` that ran it) to `ledger`, saved after every round. Raises `Preempted`
    at a round boundary after a signal.
    """
    rank, world = rank_and_world_size()
    for start in range(0, len(todo), world):
        batch = todo[start : start + world]
        record = None
        if rank < len(batch):
            record = {**evaluate(batch[rank]), "index": batch[rank], "rank": rank}
        ledger.add(r for r in all_gather_objects(record) if r is not None)
        ledger.save()
        stop_if_signalled(f"after candidate {batch[-1]}; ledger {ledger.path}")
