"""User errors: mistakes in what was asked for, reported in one line without a traceback.

A config that cannot work, a missing data root, an unknown backbone, a file that is not a
checkpoint, a run that diverged: the apps print `<app>: error: <message>` and exit with status 2.
Anything else is a bug and keeps its traceback. `HYDRA_FULL_ERROR=1` shows the traceback of a
user error too. This module imports nothing heavy, so the apps can use it before torch loads.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

# The exit status of a user error (argparse's for a bad command line; 1 stays for bugs).
USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake in the config, data, checkpoint or combination asked for; its message says what
    is wrong and what would work."""


class ConfigError(UserError, ValueError):
    """A composed config that cannot work, found before anything expensive starts."""


class DataRootError(UserError, FileNotFoundError):
    """The data root or files under it are missing (dynlab never downloads datasets)."""


class CheckpointError(UserError, ValueError):
    """A file that is missing, damaged, not a checkpoint, or not one of this model."""


class TrainingDiverged(UserError, FloatingPointError):
    """The training loss (or the weights) became non-finite; the run stopped at that step."""


class SearchMismatch(UserError, ValueError):
    """A resumed search whose saved ledger belongs to another search (space, data, settings)."""


class ResultsError(UserError, ValueError):
    """A run dir's results.json that cannot be read."""


class ExportError(UserError, ValueError):
    """A deploy form that cannot be exported (an op the exporter cannot take), an export that does
    not match its PyTorch form (the size of the mismatch), or a folder that is not an export."""


def require_data_root(dataset: str, root: str | Path | None, layout: str) -> Path:
    """`root` as a folder that exists; a DataRootError saying what is wrong and where the data
    goes otherwise (cheap: the apps check it before importing torch, the datamodules again)."""
    how = where_data_goes(layout)
    if root is None:
        raise DataRootError(f"{dataset}: dataset.root is not set. {how}")
    path = Path(root).expanduser()
    if path.is_file():
        raise DataRootError(f"{dataset}: the data root {path} is a file, not a directory. {how}")
    if not path.is_dir():
        raise DataRootError(f"{dataset}: the data root {path} does not exist. {how}")
    return path


def where_data_goes(layout: str) -> str:
    """The hint every data-root error ends with: the expected layout and how to point at it."""
    return (
        f"Expected {layout}. Point dynlab at the folder with dataset.root=/path/to/data "
        "(dynlab never downloads datasets)."
    )


def full_error() -> bool:
    """Whether the user asked for whole tracebacks (`HYDRA_FULL_ERROR=1`), user errors included."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def exit_with_user_error(prog: str, message: str) -> NoReturn:
    """Print `<prog>: error: <message>` as one line on stderr and exit with status 2."""
    line = " ".join(message.split())
    print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(USER_ERROR_EXIT)


@contextmanager
def reporting_user_errors(prog: str) -> Iterator[None]:
    """Turn a `UserError` raised inside into one line on stderr and exit status 2."""
    try:
        yield
    except UserError as err:
        if full_error():
            raise
        exit_with_user_error(prog, str(err))
