"""Early-exit speed of an S2D network on CPU: wall-clock speed-up against MACs speed-up.

The measurement of `benchmarks/early_exit.py` (budget levels calibrated by the real budgeted-batch
code, early exit timed against the deploy form run to its last exit, eager PyTorch and ONNX
Runtime, batch 64 and 1) applied to S2DNAS's default
transformation of a CIFAR ResNet-56: 3 stages, G=8, equal split, concat everywhere. Untrained
weights do not matter here: thresholds are calibrated for each budget level's exit fractions.
The network is timed in its deploy form (BatchNorm folded into each stage's weight blocks, one
flat fx program per stage); `--form train` times the training form.
Prints one JSON object. Run: `.venv/bin/python benchmarks/s2dnas_early_exit.py [--threads N]`.
Figures (eager and ONNX Runtime, and why q <= 0.5 misses the target: the thin full-resolution
first stage costs more per MAC) in benchmarks/README.md.
"""

from __future__ import annotations

import early_exit
from torch import nn

from dynlab.backbones import create_backbone
from dynlab.techniques.s2dnas.analysis import analyse_backbone
from dynlab.techniques.s2dnas.model import S2DNet
from dynlab.techniques.s2dnas.settings import resolve_settings

BACKBONE, INPUT_SIZE, NUM_STAGES, GROUPS = "cifar_resnet56", (3, 32, 32), 3, 8


def make_s2d_model() -> tuple[nn.Module, tuple[int, int, int]]:
    """The S2D network of ResNet-56 (answering dynlab.protocol) and its input size."""
    net = create_backbone(BACKBONE, num_classes=10, in_chans=INPUT_SIZE[0])
    layout = analyse_backbone(net, INPUT_SIZE, BACKBONE)
    settings = resolve_settings(None, None, NUM_STAGES, layout.num_layer_groups, GROUPS)
    return S2DNet(net, layout, settings, GROUPS, INPUT_SIZE), INPUT_SIZE


if __name__ == "__main__":
    early_exit.make_model = make_s2d_model
    early_exit.main()
