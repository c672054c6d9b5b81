"""FBNetV2 (Wan et al., CVPR 2020): DMaskingNAS search over channels and input resolution."""
