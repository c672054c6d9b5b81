"""`dynlab-evaluate ckpt_path=...`: test metrics, anytime and budgeted curves of a checkpoint.

The model and data are built with the training run's overrides (read from its `.hydra/`), then
the ones given here (e.g. `evaluation.qs=[0.5,1.0]` or another `dataset.root=`).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from dynlab.apps._hydra import ddp_job_scope, dynlab_main
from dynlab.errors import CheckpointError, reporting_user_errors
from dynlab.validation import ConfigError, build_run, checkpoint_problem, validate_run


def training_overrides(ckpt_path: Path) -> list[str]:
    """The overrides of the run that wrote `ckpt_path` (`<run>/checkpoints/<phase>/x.ckpt`)."""
    for parent in ckpt_path.resolve().parents:
        saved = parent / ".hydra" / "overrides.yaml"
        if saved.exists():
            return list(yaml.safe_load(saved.read_text()) or [])
    return []


@dynlab_main("dynlab-evaluate", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    with reporting_user_errors("dynlab-evaluate"):
        return evaluate_checkpoint(cfg)


def evaluate_checkpoint(cfg: DictConfig) -> float | None:
    """Rebuild the training run's model and data, load the checkpoint, evaluate, write results."""
    ckpt_path = Path(cfg.ckpt_path)
    problem = checkpoint_problem(ckpt_path)
    if problem is not None:
        raise CheckpointError(f"ckpt_path={ckpt_path}: {problem}")
    overrides = [*training_overrides(ckpt_path), *HydraConfig.get().overrides.task]
    try:
        cfg = compose("evaluate", overrides=[*overrides, f"run_dir={cfg.run_dir}"])
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(
            f"the training run's overrides plus these do not compose ({' '.join(overrides)}): {err}"
        ) from err
    validate_run(cfg)
    # torch, Lightning, timm: only once the config is known to be valid.
    from dynlab import checkpointing as ckpt
    from dynlab.logging import quiet_console
    from dynlab.results import update_results
    from dynlab.runner import evaluate, run_identity
    from dynlab.summary import print_summary

    quiet_console()
    with ddp_job_scope(cfg.run_dir):
        datamodule, module = build_run(cfg)
        ckpt.load_module_state(module, ckpt_path)
        metrics = evaluate(cfg, module, datamodule)
        results = update_results(
            cfg.run_dir,
            **run_identity(cfg),
            status="completed",
            checkpoint=str(ckpt_path.resolve()),
            metrics=metrics,
            **module.deployed_cost(datamodule.info.input_size),
        )
        print_summary(results, cfg.run_dir)
        return metrics.get("test/top1")


if __name__ == "__main__":
    main()
