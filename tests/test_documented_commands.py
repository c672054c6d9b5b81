"""Every dynlab command the docs and presets show does what they say, up to training.

The commands are collected from the READMEs, docs/ and the presets' and configs' comments; each is
composed as its app would compose it, validated, and its datamodule and technique built with the
technique's own run checks (`check_run`), on tiny data in the documented layouts. A multirun is
taken through its first and last job (its sweep given on the command line or in the preset).
Placeholders in angle brackets become real files of the kind they name: a checkpoint, a search
result of the run's own space.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from dynlab.apps._hydra import CONFIG_DIR, CONFIG_MODULE
from dynlab.apps.sweep_file import expand
from dynlab.building import build_datamodule
from dynlab.config import TrainerConfig
from dynlab.data.fake import write_fake_cifar, write_fake_fashion_mnist, write_fake_imagenet
from dynlab.techniques.base import dataset_backbone
from dynlab.validation import build_run, validate_config

from .conftest import REPO, compose_in

DOCS = [
    REPO / "README.md",
    # docs/EXTENDING.md's commands need the guide's own package: tests/test_extending_guide.py
    # writes it out and runs them.
    *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "EXTENDING.md"),
    *sorted((REPO / "experiments").glob("*/README.md")),
    REPO / "slurm" / "README.md",
    REPO / "benchmarks" / "README.md",
]
CONFIGS = [
    *sorted((REPO / "experiments").glob("*/*.yaml")),
    *sorted(Path(CONFIG_DIR).rglob("*.yaml")),
]
APPS = {
    "dynlab-train": "config",
    "dynlab-search": "search",
    "dynlab-rank": "rank",
    "dynlab-evaluate": "evaluate",
}
COMMAND = re.compile(r"(?:\.venv/bin/)?(dynlab-(?:train|search|rank|evaluate))\b(.*)")
FLAGS = {"-m", "--multirun"}


@dataclass(frozen=True)
class Command:
    """A documented command: where it is written, its app and its arguments."""

    where: str
    app: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {self.app} {' '.join(self.args)}"


def spans(path: Path) -> list[str]:
    """The places a command can be written: fenced code lines and inline code in markdown, every
    line of YAML (comments and help texts); backslash continuations joined."""
    text = re.sub(r"\\\n\s*" + ("#?\\s*" if path.suffix == ".yaml" else ""), " ", path.read_text())
    # A placeholder is one word, even where the docs write `<baseline run>`.
    text = re.sub(r"<([^<>\n]*)>", lambda m: "<" + m.group(1).replace(" ", "_") + ">", text)
    if path.suffix == ".yaml":
        return [line.strip().lstrip("# ") for line in text.splitlines()]
    found, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            found.append(line)
        else:
            found += re.findall(r"`([^`]+)`", line)
    return found


def arguments(rest: str) -> tuple[str, ...] | None:
    """The overrides and flags after an app's name, up to the first word that is neither (prose,
    a shell comment); None when there are none (the app named in a sentence)."""
    try:
        words = shlex.split(rest.split(" #")[0].split("  (")[0])
    except ValueError:
        return None
    args: list[str] = []
    for word in words:
        if word in FLAGS or "=" in word or word.startswith("+"):
            args.append(word)
        else:
            break
    return tuple(args) or None


def documented_commands() -> list[Command]:
    commands: dict[tuple[str, tuple[str, ...]], Command] = {}
    for path in [*DOCS, *CONFIGS]:
        for span in spans(path):
            for match in COMMAND.finditer(span):
                args = arguments(match.group(2))
                if args is not None:
                    where = str(path.relative_to(REPO) if path.is_relative_to(REPO) else path.name)
                    commands.setdefault(
                        (match.group(1), args), Command(where, match.group(1), args)
                    )
    return list(commands.values())


COMMANDS = documented_commands()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-10/100, ImageNet and Fashion-MNIST in their standard layouts, a few images each."""
    root = tmp_path_factory.mktemp("data")
    write_fake_fashion_mnist(root / "fashion-mnist", num_train=5200, num_test=20)
    write_fake_cifar(root, num_classes=10, num_train=40, num_test=20, seed=0)
    write_fake_cifar(root, num_classes=100, num_train=200, num_test=100, seed=1)
    write_fake_imagenet(
        root / "imagenet", num_classes=4, per_class_train=6, per_class_val=2, size=40
    )
    return root


def concrete(arg: str, data_root: Path, files: Path) -> str:
    """An argument with its placeholder made real: data roots point at the tiny data, a
    `<...>.ckpt` at a checkpoint file, a `<...>.json` at a search result (written later)."""
    key, _, value = arg.partition("=")
    if key.lstrip("+") == "dataset.root":
        return f"{key}={data_root / 'imagenet' if value.rstrip('/').endswith('imagenet') else data_root}"
    if "<" not in value and "..." not in value:
        return arg
    path = files / (re.sub(r"\W+", "_", key) + (".json" if value.endswith(".json") else ".ckpt"))
    if path.suffix == ".ckpt":
        torch.save({"state_dict": {}}, path)  # a checkpoint file; `write_placeholders` fills some
    else:
        path.touch()
    return f"{key}={path}"


def jobs(command: Command, args: list[str]) -> list[list[str]]:
    """One job, or a multirun's first and last (sweeps from the command line and the preset)."""
    if not FLAGS & set(args):
        return [args]
    given = expand([a for a in args if a not in FLAGS])
    params = OmegaConf.select(hydra_node(given[0], command.app), "sweeper.params") or {}
    swept = expand([f"{k}={v}" for k, v in params.items()])
    every = [[*job, *extra] for job in given for extra in swept]
    return [every[0], every[-1]] if len(every) > 1 else every


def hydra_node(args: list[str], app: str) -> DictConfig:
    """The hydra node of an app's composition (a preset's sweep lives there)."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(APPS[app], overrides=args, return_hydra_config=True).hydra


def write_placeholders(cfg: DictConfig, files: Path) -> None:
    """Placeholders whose content the run reads before training, made for the run's own backbone:
    an `init_from` checkpoint (a placeholder, or a run dir's that a comparison's first stage would
    have written) holds its untrained static weights; a `<...>.json` search result its
    space's first architecture (FBNetV2: the argmax of untrained logits; SPOS: block 0 everywhere;
    a ranking's: that one architecture)."""
    static, results = list(files.glob("*init_from.ckpt")), list(files.glob("*.json"))
    beside = OmegaConf.select(cfg, "technique.init_from")
    if beside and not Path(beside).exists():  # a comparison's second stage reads its first's
        Path(beside).parent.mkdir(parents=True, exist_ok=True)
        static.append(Path(beside))
    if not static and not results:
        return
    net = dataset_backbone(OmegaConf.to_object(cfg.backbone), build_datamodule(cfg).info)
    for path in static:
        torch.save(net.state_dict(), path)
    if results:
        first = [0] * net.space.num_genes if hasattr(net, "space") else []
        # A search's result names its architecture; a ranking's lists the ones it ranked.
        genes = {"genes": first, "architectures": [{"genes": first}]} if first else {}
        result = {"choices": net.choices()} if hasattr(net, "choices") else genes
        for path in results:
            path.write_text(json.dumps(result))


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_documented_command_passes_validation_and_run_checks(
    command: Command, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DYNLAB_DATA", str(data_root))
    files = tmp_path / "files"
    files.mkdir()
    args = [concrete(a, data_root, files) for a in command.args]
    for number, job in enumerate(jobs(command, args)):
        cfg = compose_in(job, APPS[command.app], tmp_path / f"run{number}")
        validate_config(cfg)
        write_placeholders(cfg, files)
        build_run(cfg)


def test_commands_are_collected_from_every_kind_of_doc() -> None:
    places = {c.where.split("/")[0] for c in COMMANDS}
    assert {"README.md", "experiments", "slurm", "src"} <= places, places
    # Prose that names an app is no command; a command keeps its overrides and flags only.
    assert arguments(" trains the split/concat given here") is None
    assert arguments(" -m +experiment=compare/digits seed=0,1,2   # three seeds") == (
        "-m",
        "+experiment=compare/digits",
        "seed=0,1,2",
    )
    assert len(COMMANDS) > 40


def test_every_documented_training_command_names_its_technique() -> None:
    """The default technique is S2DNAS: an example without `technique=` (or a preset) trains it,
    whatever the example was meant to show."""
    silent = [
        str(c)
        for c in COMMANDS
        if c.app != "dynlab-evaluate"
        and set(c.args) - FLAGS
        and not any(a.startswith(("technique=", "+experiment=")) for a in c.args)
    ]
    assert not silent, silent


def test_readme_lists_exactly_the_trainer_arguments_the_schema_takes() -> None:
    row = next(
        line
        for line in (REPO / "README.md").read_text().splitlines()
        if line.startswith("| `trainer`")
    )
    listed = set(re.findall(r"`(\w+)`", row.split("schema holds")[1].split(";")[0]))
    assert listed - {"TrainerConfig"} == {f.name for f in fields(TrainerConfig)}
