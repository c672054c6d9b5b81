"""`dynlab-search technique=s2dnas ...`: a technique's search schedule (search, then retrain the best)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from dynlab.apps._hydra import CONFIG_DIR, run_schedule_app


@hydra.main(config_path=CONFIG_DIR, config_name="search", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run_schedule_app("dynlab-search", cfg)


if __name__ == "__main__":
    main()
