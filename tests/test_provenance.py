"""Provenance records: what this process runs on, and a resumed run's earlier starts kept."""

from __future__ import annotations

import subprocess

import torch

from dynlab import provenance

from .conftest import REPO


def test_record_names_this_checkouts_commit_versions_and_threads() -> None:
    record = provenance.collect(seed=7)

    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert record["seed"] == 7
    assert record["git"]["commit"] == head
    assert record["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert record["threads"] == torch.get_num_threads()
    assert "logical CPUs" in record["cpu"]


def test_a_resume_on_other_code_keeps_the_earlier_start() -> None:
    first = provenance.collect(seed=0)
    same = provenance.merged({"provenance": first}, {**first, "recorded": "later"})
    assert same == {"provenance": {**first, "recorded": "later"}, "provenance_history": []}

    moved = {**first, "git": {"commit": "f" * 40, "dirty": False}}
    resumed = provenance.merged({"provenance": first}, moved)
    assert resumed["provenance"] == moved and resumed["provenance_history"] == [first]
    # A third start on the same code as the second adds nothing more.
    again = provenance.merged(resumed, {**moved, "recorded": "later"})
    assert again["provenance_history"] == [first]
