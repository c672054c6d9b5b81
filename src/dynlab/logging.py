"""What a run prints and where its logs go: a quiet console, W&B that never blocks, W&B tables.

The console shows one line per phase, the progress bar, warnings and the end summary; Lightning's
info lines (device lists, tips, seeds) and Python warnings go to the run's log file
(`<run dir>/<app>.log`, Hydra's file handler) only. W&B asked to stream (`WANDB_MODE=online`) on
a node that cannot reach its server logs offline instead, after a short probe, and says how to
upload the run later.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import wandb
from pytorch_lightning.loggers import Logger, WandbLogger


def log_records(
    loggers: Iterable[Logger],
    key: str,
    records: Sequence[Mapping[str, Any]],
    x: str,
    y: str,
    title: str,
) -> None:
    """Log `records` as the W&B table `{key}/table` and a line plot of `y` over `x` as `{key}/plot`.

    Only scalar fields become columns (lists such as per-exit thresholds stay in results.json).
    Loggers that are not W&B loggers are skipped, so this is a no-op without W&B.
    """
    wandb_loggers = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if not wandb_loggers or not records:
        return
    columns = [c for c, v in records[0].items() if isinstance(v, int | float | str)]
    missing = {x, y} - set(columns)
    if missing:
        raise ValueError(f"records have no scalar field(s) {sorted(missing)}; columns: {columns}")
    for logger in wandb_loggers:
        table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in records])
        logger.experiment.log(
            {f"{key}/table": table, f"{key}/plot": wandb.plot.line(table, x, y, title=title)}
        )


def log_images(loggers: Iterable[Logger], images: Mapping[str, str | Path]) -> None:
    """Log PNG files as W&B images under their keys (a W&B image panel); no-op without W&B."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and images:
            logger.experiment.log({k: wandb.Image(str(p)) for k, p in images.items()})


# Seconds to wait for the W&B server before logging offline (wandb's own init_timeout is 90 s).
WANDB_PROBE_TIMEOUT = 5.0
DEFAULT_WANDB_URL = "https://api.wandb.ai"
_reachable: dict[str, bool] = {}


def wandb_mode(mode: str, run_dir: str | Path, timeout: float = WANDB_PROBE_TIMEOUT) -> str:
    """`mode`, or "offline" when it is "online" and the W&B server does not answer in `timeout`
    seconds (most compute nodes have no internet); one warning line says how to sync later."""
    if mode != "online":
        return mode
    url = os.environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_URL
    if url not in _reachable:
        _reachable[url] = server_reachable(url, timeout)
        if not _reachable[url]:
            print(
                f"[dynlab] warning: W&B server {url} unreachable within {timeout:g} s, logging "
                f"offline; upload later with: wandb sync {Path(run_dir) / 'wandb'}/offline-run-*",
                file=sys.stderr,
                flush=True,
            )
    return mode if _reachable[url] else "offline"


def server_reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to `url`'s host and port opens within `timeout` seconds.

    The probe runs in a daemon thread: a name look-up without DNS can block far longer than the
    socket timeout, and is abandoned with it.
    """
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


class ConsoleFilter(logging.Filter):
    """Lets through warnings and errors, and dynlab's own info lines; the rest stays in files."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":
            return False
        return record.levelno >= logging.WARNING or record.name.startswith("dynlab")


def quiet_console() -> None:
    """Keep Lightning's info lines (tips, device lists, seeds) and Python warnings off the
    console; Hydra's file handler still records them in the run's log file. Idempotent."""
    logging.captureWarnings(True)
    for name in ("", "pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        for handler in logging.getLogger(name).handlers:
            console = isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            )
            if console and not any(isinstance(f, ConsoleFilter) for f in handler.filters):
                handler.addFilter(ConsoleFilter())


def announce_phase(cfg: Any, module: Any, phase: Any) -> str:
    """Print (on rank zero) and return the line that opens a phase: its name, its length and
    whether it resumes. `module` is the technique's DynlabModule, `phase` a `Phase`."""
    from pytorch_lightning.utilities import rank_zero_only

    from dynlab import checkpointing as ckpt

    if str(phase.kind) == "fit":
        epochs = module.phase_epochs(phase)
        epochs = cfg.trainer.max_epochs if epochs is None else epochs
        what = f"{epochs} epoch{'s' * (epochs != 1)}"
        if str(module.recipe(phase.name).train_split) == "whole":
            what += " on the whole training split (held-out val included)"
    else:
        what = f"{phase.kind} phase"
    last = ckpt.phase_dir(cfg.run_dir, phase.name) / ckpt.LAST
    where = ", resuming from its last checkpoint" if last.exists() else ""
    line = f"[dynlab] phase {phase.name}: {what}{where}"
    if getattr(rank_zero_only, "rank", 0) == 0:
        print(line, flush=True)
    return line
