"""docs/EXTENDING.md, followed step by step: its code blocks are the files of a package of one's
own (`mylab`: a backbone, a dataset, a technique, their schemas and configs, a launcher), and its
commands make a data set and train on it with dynlab's real app.

The guide marks what this test takes: a fenced block whose info string holds `file=<path>` is
written to that path of a temporary project, and the lines of a ```bash run``` block are run there
in order, as a user would type them. If the guide's code or commands are wrong, these tests fail.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dynlab.config import BackboneConfig
from dynlab.data.base import DataInfo
from dynlab.evaluation.early_exit import early_exit_predict
from dynlab.evaluation.macs import count_macs

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "EXTENDING.md"
# A fenced block: its info string (language, then `file=...` or `run`) and its body.
FENCE = re.compile(r"^```(?P<info>[^`\n]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
PACKAGE_FILES = {
    "mylab/backbones.py",
    "mylab/data.py",
    "mylab/cascade.py",
    "mylab/config.py",
    "mylab/train.py",
    "mylab/conf/backbone/tiny_convnet.yaml",
    "mylab/conf/dataset/arrays.yaml",
    "mylab/conf/technique/cascade.yaml",
    "make_arrays.py",
}
# What this test adds to the guide's training command: one epoch, no progress bar, CSV logs.
QUICK = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=csv"]


def guide_blocks() -> list[tuple[str, str]]:
    """(info string, body) of every fenced block of the guide, in order."""
    return [(m["info"].strip(), m["body"]) for m in FENCE.finditer(GUIDE.read_text())]


def guide_files() -> dict[str, str]:
    """The blocks marked `file=<path>`: path -> content."""
    files = {}
    for info, body in guide_blocks():
        marks = [word.removeprefix("file=") for word in info.split() if word.startswith("file=")]
        if marks:
            assert marks[0] not in files, f"the guide writes {marks[0]} twice"
            files[marks[0]] = body
    return files


def guide_commands() -> list[str]:
    """The lines of the blocks marked `run`, in order."""
    return [
        line
        for info, body in guide_blocks()
        if info.split()[1:] == ["run"]
        for line in body.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def write_project(root: Path) -> None:
    """The guide's files under `root`, plus the empty `mylab/__init__.py` it asks for."""
    for path, content in guide_files().items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(content)
    (root / "mylab" / "__init__.py").write_text("")


def test_guide_marks_every_file_and_its_command() -> None:
    assert set(guide_files()) == PACKAGE_FILES
    commands = guide_commands()
    assert commands[0].startswith("python make_arrays.py ")
    assert len(commands) == 2 and commands[1].startswith("python -m mylab.train ")
    for part in ("technique=cascade", "backbone=tiny_convnet", "dataset=arrays"):
        assert part in commands[1].split()


@pytest.fixture
def mylab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The guide's package importable in this process; forgotten again afterwards."""
    write_project(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [n for n in sys.modules if n == "mylab" or n.startswith("mylab.")]:
        del sys.modules[name]


def small_net(in_chans: int = 1, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_chans, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )


def test_cascade_answers_the_dynamic_model_protocol(mylab: Path) -> None:
    """The guide's CascadeNet: cheapest exit first, measured cumulative MACs, a session that
    drops the samples that left before exit 2 runs, and a deploy form with BatchNorm folded."""
    from mylab.cascade import CascadeNet

    torch.manual_seed(0)
    net = CascadeNet(small_net(), small_net(), (4, 4))
    for part in (net.small, net.large):  # BatchNorm statistics that are not the identity
        part[1].running_mean.uniform_(-1, 1)
        part[1].running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        first, second = net.forward_exits(x)
    assert first.shape == second.shape == (16, 10)
    macs = net.exit_macs((1, 8, 8))
    assert macs == [count_macs(net.small, (1, 4, 4)), macs[0] + count_macs(net.large, (1, 8, 8))]
    assert 0 < macs[0] < macs[1]

    seen: list[int] = []
    hook = net.large.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    confident = first.softmax(1).amax(1)
    threshold = float(confident.median())
    logits, exits = early_exit_predict(net, x, [threshold, 0.0])
    hook.remove()
    leaves = confident >= threshold
    assert torch.equal(exits, (~leaves).long())
    torch.testing.assert_close(logits, torch.where(leaves[:, None], first, second))
    assert seen == [int((~leaves).sum())], "exit 2 ran on the samples that had left too"

    deployed = net.deploy()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    with torch.no_grad():
        for got, want in zip(deployed.forward_exits(x), (first, second), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_check_run_says_what_the_guide_shows(mylab: Path) -> None:
    """The guide's example error line is the cascade's `check_run` message."""
    from mylab.cascade import CascadeModule
    from mylab.config import CascadeConfig

    shown = next(
        line
        for info, body in guide_blocks()
        for line in body.splitlines()
        if line.startswith("dynlab-train: error: technique=cascade")
    )
    module = CascadeModule(
        CascadeConfig(small_from_epoch=5),
        BackboneConfig(name="cifar_resnet20"),
        DataInfo("arrays", 10, (1, 8, 8)),
    )
    with pytest.raises(ValueError) as err:
        module.check_run(OmegaConf.create({"trainer": {"max_epochs": 5}}))
    assert shown.endswith(f": {err.value}")


@pytest.mark.slow
def test_guide_commands_train_the_new_technique_backbone_and_dataset(tmp_path: Path) -> None:
    """The guide's commands in a fresh project: the data set is written, and one epoch of
    technique=cascade on backbone=tiny_convnet and dataset=arrays completes with both exits."""
    write_project(tmp_path)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DYNLAB_OUTPUTS": str(tmp_path / "out"),
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("DYNLAB_DATA", None)  # the schema's default root: data/arrays
    for number, command in enumerate(guide_commands()):
        if "mylab.train" in command:
            command = " ".join([command, *QUICK])
        log = tmp_path / f"command_{number}.log"
        with log.open("w") as out:  # a file, not a pipe (see conftest.run_cli)
            proc = subprocess.run(
                ["bash", "-c", command],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=300,
            )
        assert proc.returncode == 0, f"{command} failed:\n{log.read_text()[-6000:]}"

    assert (tmp_path / "data" / "arrays" / "train.npz").is_file()
    (results_file,) = (tmp_path / "out").glob("*/*/results.json")
    run_dir = results_file.parent
    results = json.loads(results_file.read_text())
    assert results["status"] == "completed", results.get("error")
    assert (results["technique"], results["backbone"], results["dataset"]) == (
        "cascade",
        "tiny_convnet",
        "arrays",
    )
    assert results["config"]["trainer"]["max_epochs"] == 1
    assert len(results["exit_macs"]) == 2 and 0 < results["exit_macs"][0] < results["exit_macs"][1]
    assert [r["exit"] for r in results["anytime"]] == [1, 2]
    assert results["budgeted"]["curve"]
    # Both exits were evaluated, and the run's top-1 is its last exit's.
    assert "test/top1_exit1" in results["metrics"]
    assert results["metrics"]["test/top1"] == results["metrics"]["test/top1_exit2"]
    assert (run_dir / "checkpoints" / "train" / "done").exists()
    assert (run_dir / "plots" / "anytime.png").is_file()
    assert (run_dir / "plots" / "budgeted.png").is_file()
    assert "BatchNorm left unfolded" not in (run_dir / "train.log").read_text()
