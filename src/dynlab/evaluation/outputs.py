"""Softmax outputs of every exit over a whole split, gathered across DDP ranks.

Budgeted-batch calibration needs the outputs of *all* samples at once, so under DDP each rank
evaluates a contiguous shard and the shards are all-gathered in rank order before any evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Run `module` in eval mode under no_grad, then give each submodule back its own train flag."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        for m, training in modes:
            m.training = training


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU for a module with neither)."""
    tensors = (*module.parameters(), *module.buffers())
    return tensors[0].device if tensors else torch.device("cpu")


def collect_exit_probs(
    model: nn.Module, dataloader: Iterable[tuple[Tensor, Tensor]], gather: bool = True
) -> tuple[Tensor, Tensor]:
    """Softmax of every exit of `model.forward_exits` over `dataloader`: probs [K,N,C], targets [N].

    Runs in eval mode under no_grad on the model's device and returns CPU tensors. Under an
    initialised torch.distributed, each rank passes its contiguous shard of the split (rank r of W
    holding items [r*N//W, (r+1)*N//W), as dynlab.data's EvalSampler gives) and every rank gets
    all shards concatenated in rank order: the whole split once, whatever the number of processes.
    `gather=False` keeps this process's outputs only (a search where each rank scores its own
    candidate on the whole split).
    """
    if not hasattr(model, "forward_exits"):
        raise TypeError(f"{type(model).__name__} has no forward_exits (see dynlab.protocol)")
    device = module_device(model)
    probs, targets = [], []
    with evaluating(model):
        for x, y in dataloader:
            exits = model.forward_exits(x.to(device))
            probs.append(torch.stack([e.float().softmax(dim=-1) for e in exits]).cpu())
            targets.append(y.cpu())
    if not probs:
        raise ValueError("the dataloader yielded no batches")
    local_probs, local_targets = torch.cat(probs, dim=1), torch.cat(targets)
    if gather and _world_size() > 1:
        comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        return _gather_shards(local_probs, comm, dim=1), _gather_shards(local_targets, comm, dim=0)
    return local_probs, local_targets


def _world_size() -> int:
    """Number of processes in the initialised torch.distributed group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_shards(local: Tensor, device: torch.device, dim: int) -> Tensor:
    """Concatenate every rank's `local` along `dim` in rank order; shards may differ in size."""
    world = dist.get_world_size()
    size = torch.tensor([local.shape[dim]], device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    pad_shape = list(local.shape)
    pad_shape[dim] = longest - local.shape[dim]
    padded = torch.cat([local.to(device), local.new_zeros(pad_shape, device=device)], dim=dim)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat(
        [g.narrow(dim, 0, int(s.item())).cpu() for g, s in zip(gathered, sizes, strict=True)],
        dim=dim,
    )
