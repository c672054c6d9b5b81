"""`dynlab-export ckpt_path=...`: a checkpoint's deploy form as ONNX graphs (one per exit) with a
manifest, checked against PyTorch at every exit on test images (dynlab.evaluation.export)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from dynlab.apps._hydra import dynlab_main
from dynlab.apps.evaluate import checked_checkpoint, compose_run, training_overrides
from dynlab.errors import reporting_user_errors
from dynlab.validation import build_run


@dynlab_main("dynlab-export", config_name="export")
def main(cfg: DictConfig) -> str:
    with reporting_user_errors("dynlab-export"):
        return export_checkpoint(cfg)


def export_checkpoint(cfg: DictConfig) -> str:
    """Rebuild the run's model, load the checkpoint, export its deploy form; the export's dir."""
    ckpt_path = checked_checkpoint(cfg.ckpt_path)
    overrides = training_overrides(ckpt_path)
    cfg = compose_run(cfg, "export", overrides)
    from dynlab import checkpointing as ckpt
    from dynlab.evaluation.callbacks import first_test_images
    from dynlab.evaluation.export import export_onnx
    from dynlab.logging import quiet_console
    from dynlab.results import read_results

    quiet_console()
    datamodule, module = build_run(cfg)
    ckpt.load_module_state(module, ckpt_path)
    datamodule.setup("test")
    run_dir = next((p for p in ckpt_path.resolve().parents if (p / ".hydra").is_dir()), None)
    curve = read_results(run_dir).get("budgeted", {}).get("curve", []) if run_dir else []
    manifest = export_onnx(
        module.deploy(),
        datamodule.info.input_size,
        cfg.export_dir,
        images=first_test_images(datamodule, 16),
        tolerance=cfg.evaluation.latency.parity_tolerance,
        manifest={
            "technique": cfg.technique.name,
            "backbone": cfg.backbone.name,
            "dataset": cfg.dataset.name,
            "checkpoint": str(ckpt_path.resolve()),
            "overrides": overrides,
            "thresholds": {str(r["q"]): r["thresholds"] for r in curve if "thresholds" in r},
        },
    )
    diffs = ", ".join(f"{d:.2g}" for d in manifest["parity"]["max_abs_diff"])
    print(f"{len(manifest['stages'])} ONNX graph(s) in {cfg.export_dir} (parity per exit: {diffs})")
    return str(Path(cfg.export_dir))


if __name__ == "__main__":
    main()
