"""FBNetV2's DMaskingNAS supernet (Wan et al., CVPR 2020) and its standalone networks as timm
backbones: `fbnetv2_f_supernet` (ImageNet), `cifar_fbnetv2_supernet` (32x32), and the published
searched models `fbnetv2_f1` .. `fbnetv2_f4` (mobile-vision, fbnet_modeldef_cls_fbnetv2.py).

Sources and how sure each part is ([paper-tr]: the paper read through a translation; [code]:
mobile-vision's code; [reimpl]: a third-party port; [inferred]: our own choice):
- Choices, each a Gumbel-softmax over logits `alpha_*` [paper-tr eq. 4]: per stage the output
  width (all blocks of a stage share it, so residual adds always match [inferred]); per block the
  hidden width (an expansion ratio times the block's largest input width, rounded like
  mobile-vision's `get_divisible_by(., 8)` [code]), the depthwise kernel (3 or 5) and SE on/off;
  and one input resolution for the network [paper-tr].
- Channel masking [paper-tr eqs. 1-3]: a block runs once at its widest. The hidden mask goes
  after the depthwise conv's BN + activation (pw and dw are per-channel maps of the hidden width,
  so one mask there equals masking the pw output, and it zeroes what SE and pwl read); the stage
  mask goes after the pwl BN, before the residual add. The insertion points are [inferred].
- The kernel choice runs one conv with the 5x5 weight times `g5 + g3 * centre(3x3)` [inferred];
  SE runs once and mixes `g_on * SE(h) + g_off * h` [inferred].
- Resolution [paper-tr Sec. 3 Fig. E]: every option subsamples the image (nearest), runs the body
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
- The F space [reimpl macro of a mobile_cv `fbnetv2_supernet` port, notes section 4]: stem 16 s2,
  a fixed `ir_k3_hs` 16 e1 block, then five stages of widths 16-28/4, 16-40/8, 48-96/8, 72-128/8,
  112-216/8, strides 2, 2, 2, 1, 2, repeats 3, 3, 3, 4, 4, head 1984. The paper's tables were not
  readable: expansions {1..6}, resolutions {224, 192, 160, 128} and the activations (relu in the
  two first searched stages, hswish after, as in F1) are [inferred].
- The CIFAR space is ours [inferred]: stem 16 s1, the fixed 16 e1 block, four stages down to 4x4
  at 32x32, expansions {1, 3, 6}, resolutions {32, 24, 16}.

Modules: `layers` (the plain layers), `net` (the standalone network, the published F1-F4),
`space` (the presets and their checks), `masked` (the searchable block), `cost` (the measured
cost coefficients), `supernet`, and `models` (the timm entry points, registered on import).
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
from dynlab.backbones.fbnetv2.net import PUBLISHED, FBNetV2Net, expand_rows
from dynlab.backbones.fbnetv2.space import CHOICE_KEYS, SPACES, space_config
from dynlab.backbones.fbnetv2.supernet import FBNetV2Supernet

__all__ = [
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
    "se_width",
    "space_config",
]
