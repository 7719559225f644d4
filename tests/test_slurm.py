"""Launching with ``srun``: rank, world size and rendezvous from Slurm's variables, the compact
node-list syntax, and two CPU processes started with only Slurm's variables that train as the
torchrun-style launch does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_fmnist
from test_distributed import EXACT  # no augmentation, GroupNorm, float64: 2 ranks compute what 1 does
from visionzoo import distributed
from visionzoo.distributed import DistInfo, expand_nodelist, from_env, in_launched_worker, slurm_rendezvous
from visionzoo.errors import UserError
from visionzoo.run_folder import read_metrics

SRC = str(Path(__file__).resolve().parents[1] / "src")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-04]", ["node01", "node02", "node03", "node04"]),
    ("gpu-a[1,3-5],gpu-b7", ["gpu-a1", "gpu-a3", "gpu-a4", "gpu-a5", "gpu-b7"]),
    ("n1,n2", ["n1", "n2"]),
    ("localhost", ["localhost"]),
    ("a[9-11]", ["a9", "a10", "a11"]),                      # no padding: the width of the lower bound
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ("x[007]", ["x007"]),
    ("rack[1-2]-n[8-9]", ["rack1-n8", "rack1-n9", "rack2-n8", "rack2-n9"]),
    ("gpu[1-2].cluster.org,login[3]", ["gpu1.cluster.org", "gpu2.cluster.org", "login3"]),
    ("dgx-h100-[0-1],cpu[05,7]", ["dgx-h100-0", "dgx-h100-1", "cpu05", "cpu7"]),
])
def test_compact_node_lists_expand(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[4-2]", "node[a-c]", "node[]", ""])
def test_unreadable_node_lists_are_user_errors(bad):
    with pytest.raises(UserError):
        expand_nodelist(bad)


@pytest.fixture
def srun_env(monkeypatch):
    """Task 9 of 16 (local id 1) of an srun step on two nodes, no torchrun variables."""
    for key in (*LAUNCH_VARS, *[k for k in os.environ if k.startswith("SLURM_")]):
        monkeypatch.setenv(key, "")  # recorded, so that what the code under test sets is undone too
        monkeypatch.delenv(key)
    for key, value in {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
                       "SLURM_JOB_NODELIST": "gpu-a[07-08]"}.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def test_srun_tasks_take_rank_and_world_from_slurm(srun_env):
    assert from_env() == DistInfo(rank=9, world_size=16, local_rank=1)
    assert in_launched_worker()  # --devices N must not launch workers of its own
    assert slurm_rendezvous() == {"MASTER_ADDR": "gpu-a07", "MASTER_PORT": str(29500 + 4242 % 1000)}


def test_the_environment_and_the_step_node_list_win(srun_env):
    srun_env.setenv("SLURM_STEP_NODELIST", "gpu-a08")
    srun_env.setenv("MASTER_PORT", "12345")
    assert slurm_rendezvous() == {"MASTER_ADDR": "gpu-a08", "MASTER_PORT": "12345"}
    srun_env.setenv("MASTER_ADDR", "10.0.0.1")
    assert slurm_rendezvous()["MASTER_ADDR"] == "10.0.0.1"


def test_torchrun_variables_win_over_slurm(srun_env):
    srun_env.setenv("RANK", "3")
    srun_env.setenv("WORLD_SIZE", "8")
    srun_env.setenv("LOCAL_RANK", "3")
    assert from_env() == DistInfo(rank=3, world_size=8, local_rank=3)


def test_a_single_slurm_task_is_not_a_launched_worker(srun_env):
    """An sbatch script's shell or ``srun -n 1``: one process, which may launch --devices N itself."""
    srun_env.setenv("SLURM_PROCID", "0")
    srun_env.setenv("SLURM_NTASKS", "1")
    srun_env.setenv("SLURM_LOCALID", "0")
    assert from_env() == DistInfo() and not in_launched_worker()


def test_init_exports_the_rendezvous_for_env_init(srun_env, monkeypatch):
    import torch
    import torch.distributed as dist

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(
        {k: os.environ.get(k) for k in keys}, backend=backend))
    distributed.init(from_env(), torch.device("cpu"))
    assert seen == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu-a07",
                    "MASTER_PORT": "29742", "backend": "gloo"}


# ----------------------------------------------------------------------------- end to end

def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    return {**env, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}  # same threads in every compared run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_srun_tasks_train_like_one_process(tmp_path):
    data = write_fmnist(tmp_path, 256, 201)
    argv = [sys.executable, "-m", "visionzoo", "train", "fashion_mnist", "--data", str(data), *EXACT]
    one = subprocess.run([*argv, "--output", str(tmp_path / "one")], env=_clean_env(), capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    port = str(_free_port())
    tasks = [subprocess.Popen([*argv, "--output", str(tmp_path / "two"), "--devices", "2"],  # --devices: no relaunch
                              env={**_clean_env(), "SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                                   "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [t.communicate(timeout=600) for t in tasks]
    finally:
        for t in tasks:
            if t.poll() is None:
                t.kill()
    for t, (_, err) in zip(tasks, outs, strict=True):
        assert t.returncode == 0, err[-2000:]
    # One job of two ranks: only rank 0 announces it (a relaunch would start two jobs of two).
    assert sum(out.count("visionzoo: training fashion_mnist") for out, _ in outs) == 1
    assert "2 × cpu" in outs[0][0]
    res_one = json.loads((tmp_path / "one" / "results.json").read_text())
    res_two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert res_two["devices"] == 2 and res_two["ranks_in_sync"] is True
    assert not (tmp_path / "two" / "rank1").exists()
    # As tests/test_distributed.py checks a torchrun-style launch: in float64, so the round-off of a
    # gradient summed in another order stays far below the tolerances on any CPU.
    first = "checkpoints/step-000000001.safetensors"
    w1, w2 = load_file(tmp_path / "one" / first), load_file(tmp_path / "two" / first)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-12, msg=k)
    epochs = [[r for r in read_metrics(tmp_path / run / "metrics.jsonl") if r["kind"] == "epoch"]
              for run in ("one", "two")]
    assert len(epochs[0]) == len(epochs[1]) == 2
    for a, b in zip(*epochs, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-9)
    assert abs(res_two["Acc@1"] - res_one["Acc@1"]) <= 1.0
