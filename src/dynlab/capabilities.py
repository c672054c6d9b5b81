"""What a backbone can do beyond classifying, in words both sides share without torch: backbones
declare their capabilities where they register (`dynlab.backbones.register_backbone`), techniques
say which one they need (`dynlab.traits`), so no backbone is recognised by its name."""

from __future__ import annotations

from enum import Enum


class Capability(Enum):
    """One thing a backbone can do; the value says it in words, as an error message names it."""

    conv_act_options = "a network with conv/act options (ACNet, RepVGG, WeightNet, FReLU)"
    sparse_layers = "a network of LGC/SFR layers"
    spos_supernet = "an SPOS one-shot supernet"
    dmasking_supernet = "a DMaskingNAS supernet"
