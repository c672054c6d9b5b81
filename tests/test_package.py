"""dynlab as a wheel: built from the checkout, installed into a new environment, run from another
directory (configs and presets come from the package, not from the source tree)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO


def build_wheel(outdir: Path) -> Path:
    """The wheel, built offline by hatchling (a dev dependency) through its PEP 517 hook."""
    outdir.mkdir(parents=True)
    code = f"import hatchling.build as b; print(b.build_wheel({str(outdir)!r}))"
    name = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    return outdir / name


def install(wheel: Path, env: Path) -> Path:
    """A new environment holding the wheel, which reuses this environment's dependencies (a fresh
    resolve would download gigabytes of CUDA wheels) but not its editable dynlab."""
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # A path line appends this environment's packages after the new one's; the .pth files in it
    # (the editable dynlab's among them) are not processed, so `import dynlab` finds the wheel.
    Path(site, "dynlab_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    return env / "bin"


@pytest.mark.slow
def test_wheel_installs_and_trains_outside_the_checkout(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dynlab/conf/config.yaml" in names
    assert "dynlab/conf/experiment/spos/digits.yaml" in names  # presets ship as configs
    assert not [n for n in names if n.startswith("dynlab/conf/experiment") and n.endswith(".md")]
    assert any(n.endswith("licenses/LICENSE") for n in names)

    bin_dir = install(wheel, tmp_path / "env")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "DYNLAB_OUTPUTS": str(elsewhere / "out"), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600
        )

    where = run(str(bin_dir / "python"), "-c", "import dynlab; print(dynlab.__file__)")
    assert where.stdout.startswith(str(tmp_path / "env")), where.stdout + where.stderr

    job = run(str(bin_dir / "dynlab-train"), "+experiment=spos/digits", "--cfg", "job")
    assert job.returncode == 0, job.stderr
    assert "cifar_spos_supernet" in job.stdout

    helped = run(str(bin_dir / "dynlab-train"), "--help")
    assert "experiment/spos: digits" in helped.stdout and "README" in helped.stdout

    trained = run(
        str(bin_dir / "dynlab-train"),
        "technique=baseline",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "logger=csv",
    )
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    (results_file,) = (elsewhere / "out").rglob("results.json")
    results = json.loads(results_file.read_text())
    assert results["status"] == "completed"
    # One epoch of ResNet-20 on digits clearly beats chance (10 %).
    assert results["metrics"]["test/top1"] > 50
    # The installed package is no git checkout: provenance says so instead of naming a commit.
    assert results["provenance"]["git"] is None
    assert results["provenance"]["versions"]["dynlab"] == "0.1.0"
