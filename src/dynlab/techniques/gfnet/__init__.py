"""GFNet: glance at a downsampled image, then focus on patches a PPO policy picks (Wang et al. 2020)."""
