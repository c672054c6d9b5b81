"""`dynlab-sweep-file`: a multirun written out as one line of Hydra overrides per job, for sbatch.

    dynlab-sweep-file backbone=cifar_resnet20,cifar_resnet56 seed=0,1 -o sweep.txt

Sweeps use Hydra's multirun syntax (`a,b`, `choice(a,b)`, `range(0,4)`) and expand to their
cartesian product in the order Hydra's basic sweeper runs them. Every job's config is composed
once, so a typo fails here rather than in the queue. Prints the `sbatch` command that runs the file
with slurm/array.sbatch (array task i runs line i+1).
"""

from __future__ import annotations

import itertools
import shlex
from collections.abc import Sequence
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import HydraException

from dynlab.apps import app_parser

_ENUMERABLE = (ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP, ValueType.RANGE_SWEEP)


def expand(overrides: Sequence[str]) -> list[list[str]]:
    """The jobs of a multirun: the cartesian product of its sweeps, fixed overrides kept as given."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [list(job) for job in itertools.product(*(_choices(o) for o in parsed))]


def _choices(override: Override) -> list[str]:
    if not override.is_sweep_override():
        return [override.input_line]
    if override.value_type not in _ENUMERABLE:
        raise ValueError(
            f"cannot expand '{override.input_line}': only a,b / choice(...) / range(...) sweeps"
        )
    key = override.get_key_element()
    return [f"{key}={value}" for value in override.sweep_string_iterator()]


def check_composes(jobs: Sequence[Sequence[str]]) -> None:
    """Compose every job's config as dynlab-train would; raises on unknown keys or bad values."""
    from hydra import compose, initialize_config_module

    from dynlab.apps._hydra import CONFIG_MODULE

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        for number, job in enumerate(jobs):
            try:
                compose("config", overrides=list(job))
            except HydraException as err:
                raise ValueError(f"job {number} ({' '.join(job)}): {err}") from err


def sweep_line(job: Sequence[str]) -> str:
    """One job as a line of shell words (slurm/array.sbatch reads it back with the shell)."""
    return " ".join(shlex.quote(override) for override in job)


def sbatch_command(sweep_file: Path, sweep_dir: Path, num_jobs: int) -> str:
    """The command that runs every line of `sweep_file` as one task of a Slurm job array."""
    return shlex.join(
        [
            "sbatch",
            f"--array=0-{num_jobs - 1}",
            f"--output={sweep_dir}/slurm-%A_%a.out",
            "slurm/array.sbatch",
            str(sweep_file),
            str(sweep_dir),
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: `dynlab-sweep-file OVERRIDE... -o FILE [--sweep-dir DIR]`."""
    parser = app_parser("dynlab-sweep-file", __doc__)
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, sweeps as in `dynlab-train -m`"
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="the sweep file to write")
    parser.add_argument(
        "--sweep-dir", type=Path, help="where the jobs' run dirs go (default: runs/<file name>)"
    )
    args = parser.parse_args(argv)
    try:
        jobs = expand(args.overrides)
        check_composes(jobs)
    except (ValueError, HydraException) as err:
        parser.error(str(err))
    sweep_dir = args.sweep_dir or Path("runs") / args.output.stem
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(sweep_line(job) + "\n" for job in jobs))
    sweep_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create its --output folder
    print(f"{len(jobs)} jobs written to {args.output}; run them with:")
    print(sbatch_command(args.output, sweep_dir, len(jobs)))


if __name__ == "__main__":
    main()
