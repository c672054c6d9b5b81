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

# The exit status of a user error (argparse's for a bad command line; 1 stays for bugs).
USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake in the config, data, checkpoint or combination asked for; its message says what
    is wrong and what would work."""


class CheckpointError(UserError, ValueError):
    """A file that is missing, damaged, not a checkpoint, or not one of this model."""


class TrainingDiverged(UserError, FloatingPointError):
    """The training loss (or the weights) became non-finite; the run stopped at that step."""


class ResultsError(UserError, ValueError):
    """A run dir's results.json that cannot be read."""


@contextmanager
def reporting_user_errors(prog: str) -> Iterator[None]:
    """Turn a `UserError` raised inside into one line on stderr and exit status 2."""
    try:
        yield
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT) from None
