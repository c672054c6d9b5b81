"""Single Path One-Shot NAS (Guo et al., ECCV 2020): supernet, evolutionary search, retraining."""
