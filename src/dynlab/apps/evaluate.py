"""`dynlab-evaluate ckpt_path=...`: test metrics, anytime, budgeted and latency of a checkpoint;
`dynlab-evaluate export_dir=...`: the anytime and budgeted curves of an ONNX export
(`dynlab-export`, or a run's own export/) run in ONNX Runtime, which reproduce the run's.

The model and data are built with the training run's overrides (read from its `.hydra/`, or from
the export's manifest), then the ones given here (e.g. `evaluation.qs=[0.5,1.0]` or another
`dataset.root=`).
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


def training_overrides(path: Path) -> list[str]:
    """The overrides of the run that wrote `path` (`<run>/checkpoints/<phase>/x.ckpt`, or
    `<run>/export`)."""
    for parent in path.resolve().parents:
        saved = parent / ".hydra" / "overrides.yaml"
        if saved.exists():
            return list(yaml.safe_load(saved.read_text()) or [])
    return []


def compose_run(cfg: DictConfig, config_name: str, overrides: list[str]) -> DictConfig:
    """The config of a run from its training overrides plus this command's own, validated."""
    overrides = [*overrides, *HydraConfig.get().overrides.task]
    try:
        cfg = compose(config_name, overrides=[*overrides, f"run_dir={cfg.run_dir}"])
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(
            f"the training run's overrides plus these do not compose ({' '.join(overrides)}): {err}"
        ) from err
    validate_run(cfg)
    return cfg


def checked_checkpoint(ckpt_path: str) -> Path:
    path = Path(ckpt_path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"ckpt_path={path}: {problem}")
    return path


@dynlab_main("dynlab-evaluate", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    with reporting_user_errors("dynlab-evaluate"):
        if cfg.ckpt_path is None and cfg.export_dir is None:
            raise ConfigError(
                "give ckpt_path=<run>/checkpoints/<phase>/<file>.ckpt or export_dir=<dir>"
            )
        if cfg.export_dir is not None:
            return evaluate_export(cfg)
        return evaluate_checkpoint(cfg)


def evaluate_checkpoint(cfg: DictConfig) -> float | None:
    """Rebuild the training run's model and data, load the checkpoint, evaluate, write results."""
    ckpt_path = checked_checkpoint(cfg.ckpt_path)
    cfg = compose_run(cfg, "evaluate", training_overrides(ckpt_path))
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


def evaluate_export(cfg: DictConfig) -> float | None:
    """The test split (and val, for the budgeted thresholds) through the export in ONNX Runtime:
    anytime records and the budgeted curve in results.json, as a checkpoint's evaluation."""
    from dynlab.evaluation.manifest import read_manifest

    export_dir = Path(cfg.export_dir)
    manifest = read_manifest(export_dir)  # one line before torch loads when it is not an export
    overrides = manifest.get("overrides") or training_overrides(export_dir)
    cfg = compose_run(cfg, "evaluate", [o for o in overrides if not o.startswith("ckpt_path=")])
    from dynlab.evaluation.budgeted import DEFAULT_QS
    from dynlab.evaluation.callbacks import needs_held_out, publish_anytime, publish_budgeted
    from dynlab.evaluation.export import OnnxExits
    from dynlab.evaluation.outputs import collect_exit_probs
    from dynlab.logging import quiet_console
    from dynlab.results import update_results
    from dynlab.runner import run_identity

    quiet_console()
    datamodule, _ = build_run(cfg)
    datamodule.setup("test")
    model = OnnxExits(export_dir)
    exit_macs = model.exit_macs()
    update_results(
        cfg.run_dir, **run_identity(cfg), export=str(export_dir.resolve()), runtime="onnxruntime"
    )
    test = collect_exit_probs(model, datamodule.test_dataloader())
    top1 = publish_anytime(Path(cfg.run_dir), test, exit_macs)[-1]["top1"]
    if cfg.evaluation.budgeted:
        val = (None, None)
        if needs_held_out(exit_macs, datamodule):
            datamodule.setup("fit")
            val = collect_exit_probs(model, datamodule.val_dataloader())
        qs = DEFAULT_QS if cfg.evaluation.qs is None else list(cfg.evaluation.qs)
        publish_budgeted(Path(cfg.run_dir), val, test, exit_macs, qs)
    update_results(cfg.run_dir, status="completed", metrics={"test/top1": top1})
    print(f"ONNX Runtime on {export_dir}: test top-1 {top1:.2f} % at the last exit; {cfg.run_dir}")
    return top1


if __name__ == "__main__":
    main()
