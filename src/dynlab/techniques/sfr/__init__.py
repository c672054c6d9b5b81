"""SFR / CondenseNetV2: learned sparse connections pruned during training, then condensed."""
