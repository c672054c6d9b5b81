"""Adaptive inference speed of GFNet on CPU: wall-clock speed-ups next to the MACs ratios.

The measurement of `benchmarks/early_exit.py` (budget levels calibrated by the real budgeted-batch
code, early exit timed against running all T steps, batch 1 and a small batch) on a GFNet, plus
the plain backbone at full resolution timed alongside (`speedup_over_reference` next to
`macs_ratio_over_reference`). Untrained weights: thresholds are calibrated for each budget level's
exit fractions, and the policy's mean locations cost the same whatever they are.
  --model resnet50: the paper's ImageNet setting, ResNet-50 encoders, 224x224 images, P=96, T=5;
  --model digits: the digits preset, CIFAR ResNet-20 encoders, 64x64 canvases, P=24, T=4.
Prints one JSON object. Run: `.venv/bin/python benchmarks/gfnet_early_exit.py --model resnet50`.
"""

from __future__ import annotations

import argparse
import sys

import early_exit
from torch import nn

from dynlab.backbones import create_backbone
from dynlab.techniques.gfnet.model import GFNet

# name -> (backbone, classes, input size, patch size, T, GRU hidden, policy hidden)
MODELS = {
    "resnet50": ("resnet50", 1000, (3, 224, 224), 96, 5, 1024, 1024),
    "digits": ("cifar_resnet20", 10, (3, 64, 64), 24, 4, 256, 256),
}


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    args, rest = parser.parse_known_args()
    backbone, classes, size, patch, steps, hidden, policy = MODELS[args.model]

    def make_gfnet() -> tuple[nn.Module, tuple[int, int, int]]:
        nets = [create_backbone(backbone, num_classes=classes) for _ in range(2)]
        net = GFNet(
            *nets,
            num_classes=classes,
            input_size=size,
            patch_size=patch,
            steps=steps,
            classifier_hidden=hidden,
            policy_hidden=policy,
            policy_width=2 * policy,
        )
        return net, size

    early_exit.make_model = make_gfnet
    early_exit.make_reference = lambda: create_backbone(backbone, num_classes=classes)
    if args.model == "resnet50":  # about 0.25 s per image for all steps on one thread
        early_exit.BATCHES, early_exit.NUM_CALIBRATION = {8: 2, 1: 16}, 128
    sys.argv = [sys.argv[0], *rest]
    early_exit.main()


if __name__ == "__main__":
    main()
