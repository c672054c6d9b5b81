"""GFNet's patch sequences drawn on test images, with each step's prediction and confidence.

What the official repository's issues #5 and #6 ask for: where the policy looks, step by step.
"""

from __future__ import annotations

import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from dynlab.evaluation.outputs import evaluating, module_device
from dynlab.techniques.gfnet.model import GFNet, crop_corners


def patch_sequences(model: GFNet, x: Tensor, y: Tensor, columns: int = 4) -> Figure:
    """One panel per image: the image, the focus patches numbered by step, and per step the
    predicted class with its softmax confidence (the true class in the title)."""
    with evaluating(model):
        steps = model.rollout(x.to(module_device(model)))
    rows = math.ceil(len(x) / columns)
    fig = Figure(figsize=(3.2 * columns, 3.6 * rows), dpi=100)
    FigureCanvasAgg(fig)
    size = model.patch_size
    for i in range(len(x)):
        ax = fig.add_subplot(rows, columns, i + 1)
        image = x[i].float()
        image = (image - image.min()) / (image.max() - image.min()).clamp(min=1e-8)
        ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
        lines = []
        for t, step in enumerate(steps):
            confidence, predicted = step.logits[i].float().softmax(-1).max(-1)
            lines.append(f"{t + 1}: {int(predicted)} ({100 * float(confidence):.0f}%)")
            if step.location is None:
                continue
            top, left = crop_corners(step.location[i : i + 1].cpu(), x.shape[-2:], size)
            colour = f"C{t % 10}"
            ax.add_patch(
                Rectangle((int(left), int(top)), size, size, fill=False, lw=1.5, ec=colour)
            )
            ax.text(int(left) + 1, int(top) + 1, str(t + 1), color=colour, va="top", fontsize=8)
        ax.set_title(f"label {int(y[i])} | " + "  ".join(lines), fontsize=7)
        ax.set_axis_off()
    fig.suptitle("GFNet: glance (1), then focus patches 2..T; step: prediction (confidence)")
    fig.tight_layout()
    return fig
