"""Real early-exit inference: samples confident enough at an exit leave the batch for good.

Later exits compute only on the samples still in the batch (through the model's `exit_session`,
see dynlab.protocol), so the saving in MACs becomes a saving in wall-clock time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dynlab.evaluation.outputs import evaluating


def early_exit_predict(
    model: nn.Module, x: Tensor, thresholds: Tensor | Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Logits [N,C] from each sample's exit and that exit [N] (0-based), stopping work per sample.

    A sample leaves at the first exit k whose max softmax probability is >= thresholds[k] (the last
    exit takes all the rest): the same rule as `budgeted.exit_indices` on `forward_exits`, so the
    thresholds of `budgeted.calibrate_thresholds` apply. Runs in eval mode under no_grad.
    """
    if not hasattr(model, "exit_session"):
        raise TypeError(f"{type(model).__name__} has no exit_session (see dynlab.protocol)")
    n = len(x)
    thresholds = torch.as_tensor(thresholds, dtype=torch.float32, device=x.device)
    logits = exit_idx = None
    with evaluating(model):
        session = model.exit_session(x)
        if thresholds.shape != (session.num_exits,):
            raise ValueError(
                f"thresholds must have shape ({session.num_exits},) for this model's exits, "
                f"got {tuple(thresholds.shape)}"
            )
        remaining = torch.arange(n, device=x.device)  # original index of each sample still in
        for k in range(session.num_exits):
            out = session.next_exit()
            if logits is None:
                logits = out.new_empty(n, out.shape[1])
                exit_idx = torch.full((n,), session.num_exits - 1, device=x.device)
            if k == session.num_exits - 1:
                leave = torch.ones(len(out), dtype=torch.bool, device=x.device)
            else:
                leave = out.float().softmax(dim=1).amax(dim=1) >= thresholds[k]
            logits[remaining[leave]] = out[leave]
            exit_idx[remaining[leave]] = k
            remaining = remaining[~leave]
            if len(remaining) == 0:
                break
            if leave.any():
                session.keep(~leave)
    return logits, exit_idx
