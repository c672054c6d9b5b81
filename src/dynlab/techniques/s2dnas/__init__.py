"""S2DNAS (Yuan et al., ECCV 2020): a static CNN transformed into a multi-stage dynamic network,
with an RL search over the transformation's split points and concat bits."""
