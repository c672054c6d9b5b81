"""`dynlab-evaluate ckpt_path=...`: test metrics, anytime and budgeted curves of a checkpoint.

The model and data are built with the training run's overrides (read from its `.hydra/`), then
the ones given here (e.g. `evaluation.qs=[0.5,1.0]` or another `dataset.root=`).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import yaml
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dynlab import checkpointing as ckpt
from dynlab.apps._hydra import CONFIG_DIR, ddp_job_scope
from dynlab.results import update_results
from dynlab.runner import build_datamodule, build_module, evaluate, run_identity, validate_config
from dynlab.summary import print_summary


def training_overrides(ckpt_path: Path) -> list[str]:
    """The overrides of the run that wrote `ckpt_path` (`<run>/checkpoints/<phase>/x.ckpt`)."""
    for parent in ckpt_path.resolve().parents:
        saved = parent / ".hydra" / "overrides.yaml"
        if saved.exists():
            return list(yaml.safe_load(saved.read_text()) or [])
    return []


@hydra.main(config_path=CONFIG_DIR, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    ckpt_path = Path(cfg.ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    overrides = [*training_overrides(ckpt_path), *HydraConfig.get().overrides.task]
    cfg = compose("evaluate", overrides=[*overrides, f"run_dir={cfg.run_dir}"])
    with ddp_job_scope(cfg.run_dir):
        validate_config(cfg)
        datamodule = build_datamodule(cfg)
        module = build_module(cfg, datamodule)
        ckpt.load_module_state(module, ckpt_path)
        metrics = evaluate(cfg, module, datamodule)
        results = update_results(
            cfg.run_dir,
            **run_identity(cfg),
            status="completed",
            checkpoint=str(ckpt_path.resolve()),
            metrics=metrics,
            params=sum(p.numel() for p in module.model.parameters()),
            exit_macs=module.exit_macs(datamodule.info.input_size),
        )
        print_summary(results, cfg.run_dir)
        return metrics.get("test/top1")


if __name__ == "__main__":
    main()
