"""CPU threads (issue 33, item 1): training on the CPU uses this rank's cores less its busy loader
workers as intra-op threads, says so in the run header, and leaves OMP_NUM_THREADS, when set, as
the user's choice. PyTorch's default (a thread per core in every process) oversubscribed the
cores beside DataLoader workers and beside a second rank (BENCHMARKS.md "CPU threads")."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_FOLDER_RECIPE
from visionzoo import runtime
from visionzoo.cli import main
from visionzoo.runtime import cpu_threads


@pytest.mark.parametrize("cores, workers, ranks, want", [
    (8, 0, 1, (8, "8 cores")),
    (8, 2, 1, (6, "8 cores - 2 loader workers")),
    (8, 2, 2, (2, "8 cores / 2 ranks - 2 loader workers")),
    (2, 2, 1, (1, "2 cores - 2 loader workers")),
    (2, 0, 2, (1, "2 cores / 2 ranks")),
    (1, 1, 1, (1, "1 core - 1 loader worker")),
])
def test_threads_are_the_ranks_cores_less_its_workers(monkeypatch, cores, workers, ranks, want):
    monkeypatch.setattr(runtime, "cpu_cores", lambda: cores)
    assert cpu_threads(workers, ranks, {}) == want


def test_omp_num_threads_is_the_users_choice():
    assert cpu_threads(2, 1, {"OMP_NUM_THREADS": "3"}) == (torch.get_num_threads(), "OMP_NUM_THREADS=3")


def test_a_cpu_run_sets_its_threads_says_so_and_gives_them_back(jpeg_tree, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 3)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_FOLDER_RECIPE)
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    before = torch.get_num_threads()
    assert main(["train", str(recipe), "--data", str(jpeg_tree), "--output", str(tmp_path / "r"), "--workers", "2",
                 "log.progress=off"]) == 0
    assert ", 1 thread (3 cores - 2 loader workers) | batch 4" in capsys.readouterr().out
    assert seen == [1, before] and torch.get_num_threads() == before
