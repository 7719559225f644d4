"""CPU threads (issue 33, item 1): a rank alone on an idle machine keeps a thread per core; beside
other processes' load it takes off the cores they keep busy and its loader workers; several ranks
on a machine share its cores. The run header says the choice, a resumed run keeps the count its
checkpoint was written with, and OMP_NUM_THREADS, when set, is the user's choice. PyTorch's
default (a thread per core in every process) collapsed beside any other load, DataLoader workers
and a second rank included (BENCHMARKS.md "CPU threads")."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import TINY_FOLDER_RECIPE
from visionzoo import runtime
from visionzoo.checkpoint import load_latest
from visionzoo.cli import main
from visionzoo.engine import run as engine_run
from visionzoo.runtime import _busy_ticks, busy_elsewhere, cpu_threads


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


@pytest.mark.parametrize("cores, workers, ranks, elsewhere, want", [
    (2, 2, 1, 0.3, (2, "2 cores, idle")),  # idle: a thread per core, even beside workers
    (8, 0, 1, 0.0, (8, "8 cores, idle")),
    (2, 0, 1, 1.0, (1, "2 cores - 1 busy elsewhere")),
    (2, 2, 1, 0.7, (1, "2 cores - 1 busy elsewhere - 2 loader workers")),
    (8, 2, 1, 2.6, (3, "8 cores - 3 busy elsewhere - 2 loader workers")),
    (8, 2, 2, 5.0, (2, "8 cores / 2 ranks - 2 loader workers")),  # other ranks' load is this job's
])
def test_threads_beside_other_processes_load(monkeypatch, cores, workers, ranks, elsewhere, want):
    monkeypatch.setattr(runtime, "cpu_cores", lambda: cores)
    assert cpu_threads(workers, ranks, {}, elsewhere) == want


def test_busy_ticks_count_the_allowed_cores_busy_columns():
    stat = ("cpu  900 9 90 9000 5 1 2 7 0 0\n"
            "cpu0 100 1 10 4000 3 1 1 4 0 0\n"
            "cpu1 800 8 80 5000 2 0 1 3 0 0\n"
            "intr 12345\n")
    assert _busy_ticks({0}, stat) == 100 + 1 + 10 + 1 + 1  # user nice system irq softirq: not idle, iowait, steal
    assert _busy_ticks({0, 1}, stat) == 113 + 800 + 8 + 80 + 0 + 1
    assert _busy_ticks({5}, stat) == 0


def test_busy_elsewhere_sees_a_process_spinning_a_core():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        seen = busy_elsewhere(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    # Other processes on the machine only add to it: a lower bound holds wherever the test runs.
    assert seen is not None and seen >= 0.6


def test_omp_num_threads_is_the_users_choice():
    assert cpu_threads(2, 1, {"OMP_NUM_THREADS": "3"}) == (torch.get_num_threads(), "OMP_NUM_THREADS=3")


def test_a_cpu_run_sets_its_threads_says_so_and_gives_them_back(jpeg_tree, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 3)
    monkeypatch.setattr(engine_run, "busy_elsewhere", lambda: 0.0)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_FOLDER_RECIPE)
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    before = torch.get_num_threads()
    assert main(["train", str(recipe), "--data", str(jpeg_tree), "--output", str(tmp_path / "r"), "--workers", "2",
                 "log.progress=off"]) == 0
    assert ", 3 threads (3 cores, idle) | batch 4" in capsys.readouterr().out
    assert seen == [3, before] and torch.get_num_threads() == before


def test_a_resumed_run_keeps_the_thread_count_of_its_checkpoint(jpeg_tree, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 3)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_FOLDER_RECIPE)
    run = tmp_path / "r"
    argv = ["train", str(recipe), "--data", str(jpeg_tree), "--output", str(run), "log.progress=off"]
    monkeypatch.setattr(engine_run, "busy_elsewhere", lambda: 1.0)  # loaded when it started
    assert main(argv) == 0
    assert ", 2 threads (3 cores - 1 busy elsewhere) | batch 4" in capsys.readouterr().out
    assert load_latest(run)[1]["ranks"][0]["threads"] == 2
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    monkeypatch.setattr(engine_run, "busy_elsewhere", lambda: 0.0)  # idle now: the count stays, and the round-off
    (run / "results.json").unlink()  # as if it were killed after its last checkpoint
    assert main([*argv, "--resume", str(run)]) == 0
    assert ", 2 threads (as before the resume) | batch 4" in capsys.readouterr().out
    assert seen[:2] == [3, 2]
