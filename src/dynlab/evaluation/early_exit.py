"""Real early-exit inference: samples confident enough at an exit leave the batch for good.

Later exits compute only on the samples still in the batch (through the model's `exit_session`,
see dynlab.protocol), so the saving in MACs becomes a saving in wall-clock time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def early_exit_predict(
    model: nn.Module, x: Tensor, thresholds: Tensor | Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Logits [N,C] from each sample's exit and that exit [N] (0-based), stopping work per sample.

    A sample leaves at the first exit k whose max softmax probability is >= thresholds[k] (the last
    exit takes all the rest): the same rule as `budgeted.exit_indices` on `forward_exits`, so the
    thresholds of `budgeted.calibrate_thresholds` apply. Runs under no_grad; the model must be in
    eval mode (batch statistics would change as samples leave), set once by the caller because
    toggling every module's mode on each call costs more than a batch-1 forward of a small net.
    """
    if not hasattr(model, "exit_session"):
        raise TypeError(f"{type(model).__name__} has no exit_session (see dynlab.protocol)")
    if model.training:
        raise ValueError("early_exit_predict needs the model in eval mode: call model.eval() first")
    n = len(x)
    # float32 like the confidences they are compared with (as in budgeted.exit_indices).
    limits = torch.as_tensor(thresholds, dtype=torch.float32).tolist()
    logits: Tensor | None = None  # [N,C], allocated once the first exit tells C
    exit_idx = torch.empty(n, dtype=torch.long, device=x.device)
    with torch.no_grad():
        session = model.exit_session(x)
        if len(limits) != session.num_exits:
            raise ValueError(
                f"thresholds must have shape ({session.num_exits},) for this model's exits, "
                f"got {len(limits)} values"
            )
        remaining = torch.arange(n, device=x.device)  # original index of each sample still in
        for k, limit in enumerate(limits):
            out = session.next_exit()
            if logits is None:
                logits = out.new_empty(n, out.shape[1])
            last = k == session.num_exits - 1
            leave = None if last else out.float().softmax(dim=1).amax(dim=1) >= limit
            if leave is None or bool(leave.all()):  # everyone still in leaves here
                logits[remaining] = out
                exit_idx[remaining] = k
                break
            if leave.any():
                logits[remaining[leave]] = out[leave]
                exit_idx[remaining[leave]] = k
                remaining = remaining[~leave]
                session.keep(~leave)
    return logits, exit_idx
