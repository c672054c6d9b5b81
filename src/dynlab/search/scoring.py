"""Scoring a candidate on the whole held-out val split (never test): exit probabilities and the
top-1 accuracy of every exit. Each rank scores its own candidate, so nothing is gathered."""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils.data import DataLoader

from dynlab.evaluation.outputs import collect_exit_probs


def val_exit_probs(model: nn.Module, val_loader: DataLoader) -> tuple[Tensor, Tensor]:
    """Softmax of every exit over the whole val split: probs [K,N,C] and targets [N] (CPU).

    `val_loader` must hold the whole split on this rank (DynlabDataModule.whole_val_loader()).
    """
    return collect_exit_probs(model, val_loader, gather=False)


def exit_accuracies(probs: Tensor, targets: Tensor) -> list[float]:
    """Top-1 (%) of every exit from `val_exit_probs`' outputs."""
    return [100.0 * float((p.argmax(dim=1) == targets).double().mean()) for p in probs]
