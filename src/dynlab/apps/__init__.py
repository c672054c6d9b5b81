"""dynlab's command-line apps: thin entry points that compose a config, validate it and hand over."""

from __future__ import annotations

import argparse

README_POINTER = (
    "Guide, examples and figures: README.md of the dynlab repository; the training apps list\n"
    "their config groups with `dynlab-train --help`."
)


def app_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """An argparse parser whose --help shows the app's module docstring and points to the README."""
    return argparse.ArgumentParser(
        prog=prog,
        description=doc.strip(),
        epilog=README_POINTER,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
