"""FBNetV2's DMaskingNAS supernet (Wan et al., CVPR 2020) and its standalone networks as timm
backbones: `fbnetv2_f_supernet` (ImageNet), `cifar_fbnetv2_supernet` (32x32), and the published
searched models `fbnetv2_f1` .. `fbnetv2_f4` (mobile-vision, fbnet_modeldef_cls_fbnetv2.py).

Sources and how sure each part is ([paper-tr]: the paper read through a translation; [code]:
mobile-vision's code; [reimpl]: a third-party port; [inferred]: our own choice):
- Choices, each a Gumbel-softmax over logits `alpha_*` [paper-tr eq. 4]: per block its output
  width among its stage's options, its op (inverted residual, or mobile-vision's `skip` on
  stride-1 blocks [code: blocks_factory.py, basic_blocks.Identity]), hidden width (expansions of
  its widest input rounded by `get_divisible_by(., 8)` [code], or a grid of 8 in the F space), the
  depthwise kernel (3 or 5), SE on/off and activation; the stem and head widths; and one input
  resolution for the network [paper-tr]. Equal-width rules as mobile-vision's builder [code:
  irf_block.IRFBlock, basic_blocks.build_residual_connect]: residual when in == out at stride 1,
  no pw when hidden == in, identity skip when in == out; the supernet weighs each by the
  probability of equal widths (`masked.same_width`, exact at one-hot choices) [inferred].
- Channel masking [paper-tr eqs. 1-3]: a block runs once at its widest. The hidden mask goes
  after the depthwise conv's BN + activation (pw and dw are per-channel maps of the hidden width,
  so one mask there equals masking the pw output, and it zeroes what SE and pwl read); the block's
  output-width mask goes after the pwl BN, before the residual add. The insertion points are [inferred].
- The kernel choice runs one conv with the 5x5 weight times `g5 + g3 * centre(3x3)` [inferred];
  SE runs once and mixes `g_on * SE(h) + g_off * h` [inferred].
- Resolution [paper-tr]: every option subsamples the image (nearest: a
  differentiable mix of resolutions; exported nets resize bilinearly, as mobile-vision's
  published models are evaluated), runs the body
  (stem .. the head's pre-pool 1x1 conv), and its map is placed back onto the largest option's
  output grid by interspersed zeros, then the maps are mixed and pooled normalised by the mixed
  occupancy (`dynlab.nn.dmasking`). Cost: one body pass per resolution option (the F space's
  224/192/160/128 costs ~2.6x one 224 pass).
- Expected cost [paper-tr eqs. 5-10; params: `k^2 C_in C_out / groups`, Sec. 3]: one routine,
  `expected_cost(kind)`, for MACs and parameters. Every searched layer's cost is its
  coefficients, measured once on one-channel copies of the layer (`count_macs` at its input size
  under each resolution, or the parameter count: weight, and per output channel BN affine /
  bias), times the expected widths `sum_i g_i c_i` propagated layer to layer; the fixed layers
  are measured whole. At a one-hot choice `expected_macs()` / `expected_params()` equal the
  exported child's `count_macs` / parameter count, exactly.
- Blocks [code: mobile-vision irf_block.IRFBlock]: pw 1x1 + BN + act, dw kxk + BN + act,
  SE (pool, 1x1 with bias to round8(int(mid / 4)), act, 1x1 with bias, hard sigmoid),
  pwl 1x1 + BN, residual when stride 1 and in == out. Head [code: IRPoolBlock `ir_pool_hs` +
  ClsConvHead]: 1x1 to round8(6 x last width) + BN + hswish, global pool, 1x1 to the head width
  + hswish (bias-free, as IRPoolBlock's default), classifier. Init: kaiming-normal fan_out convs.
  In the supernet the pw conv is kept even for e1 (the child keeps it too, so it stays exact).
- The F space [inferred: the stage macro follows an unofficial port whose repository we could
  not trace, so it is dynlab's; widened [code] so that F1-F4 are points of it, `published.SLOTS`]: stem 8/16 s2, a searched stage of
  widths 8/16 (s1, one block), then five stages of widths 16-28/4, 16-40/8, 48-96/8, 72-128/8,
  112-224/8, strides 2, 2, 2, 1, 2, repeats 3, 4, 3, 4, 4, head 1600/1984. Hidden widths on a
  grid of 8 up to 6x the widest input, resolutions {224, 192, 160, 128}, relu/hswish options in
  the first two stages, relu then hswish after (as F1-F4) are [inferred].
- The CIFAR space is ours [inferred]: stem 16 s1, the fixed 16 e1 block, four stages down to 4x4
  at 32x32, expansions {1, 3, 6}, resolutions {32, 24, 16}.

Modules: `layers` (the plain layers), `net` (the standalone network, the published F1-F4),
`space` (the presets and their checks), `masked` (the searchable block), `cost` (the measured
cost coefficients), `supernet`, `published` (F1-F4 and their choices in the F space), and
`models` (the timm entry points, registered on import).
"""

from dynlab.backbones.fbnetv2.cost import COST_KINDS
from dynlab.backbones.fbnetv2.layers import BlockSpec, divisible_width, se_width
from dynlab.backbones.fbnetv2.models import (
    cifar_fbnetv2_supernet,
    cifar_fbnetv2_supernet_small,
    cifar_fbnetv2_supernet_tiny,
    fbnetv2_f1,
    fbnetv2_f2,
    fbnetv2_f3,
    fbnetv2_f4,
    fbnetv2_f_supernet,
)
from dynlab.backbones.fbnetv2.net import FBNetV2Net
from dynlab.backbones.fbnetv2.published import PUBLISHED, expand_rows, published_choices
from dynlab.backbones.fbnetv2.space import BLOCK_KEYS, CHOICE_KEYS, SPACES, space_config
from dynlab.backbones.fbnetv2.supernet import FBNetV2Supernet

__all__ = [
    "BLOCK_KEYS",
    "CHOICE_KEYS",
    "COST_KINDS",
    "PUBLISHED",
    "SPACES",
    "BlockSpec",
    "FBNetV2Net",
    "FBNetV2Supernet",
    "cifar_fbnetv2_supernet",
    "cifar_fbnetv2_supernet_small",
    "cifar_fbnetv2_supernet_tiny",
    "divisible_width",
    "expand_rows",
    "fbnetv2_f1",
    "fbnetv2_f2",
    "fbnetv2_f3",
    "fbnetv2_f4",
    "fbnetv2_f_supernet",
    "published_choices",
    "se_width",
    "space_config",
]
