"""`dynlab-search technique=s2dnas ...`: a technique's search schedule (search, then retrain the best)."""

from __future__ import annotations

from omegaconf import DictConfig

from dynlab.apps._hydra import dynlab_main, run_schedule_app


@dynlab_main("dynlab-search", config_name="search")
def main(cfg: DictConfig) -> float | None:
    return run_schedule_app("dynlab-search", cfg)


if __name__ == "__main__":
    main()
