"""`dynlab-rank technique=spos|anglenas|metapruning ...`: train a technique's supernet (its search
schedule's training phases), then measure how well it ranks architectures: sampled architectures
scored with inherited weights against the same trained alone (`technique.ranking`). Rerun in the
same run dir to resume; on a finished search's run dir it only ranks."""

from __future__ import annotations

from omegaconf import DictConfig

from dynlab.apps._hydra import dynlab_main, run_schedule_app


@dynlab_main("dynlab-rank", config_name="rank")
def main(cfg: DictConfig) -> float | None:
    return run_schedule_app("dynlab-rank", cfg)


if __name__ == "__main__":
    main()
