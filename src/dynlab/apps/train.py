"""`dynlab-train`: run a technique's whole schedule on a backbone and a dataset, then evaluate it.

    dynlab-train technique=s2dnas backbone=cifar_resnet56 dataset=cifar10 trainer=gpu
    dynlab-train -m backbone=cifar_resnet20,cifar_resnet56 hydra/launcher=slurm

A rerun of the same command in the same run dir resumes at the first unfinished phase.
"""

from __future__ import annotations

from omegaconf import DictConfig

from dynlab.apps._hydra import dynlab_main, run_schedule_app


@dynlab_main("dynlab-train", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_schedule_app("dynlab-train", cfg)


if __name__ == "__main__":
    main()
