"""W&B helpers: a list of records (anytime exits, budget levels) as a table plus a line plot."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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
