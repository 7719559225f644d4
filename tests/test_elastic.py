"""torchrun --max-restarts with --resume auto survives a lost worker: the agent's next round
resumes from the newest checkpoint and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_fmnist
from visionzoo.checkpoint import checkpoint_pairs

SRC = str(Path(__file__).resolve().parents[1] / "src")
ARGS = ["--epochs", "2", "--device", "cpu", "--workers", "0", "data.batch_size=32", "train.log_every=5",
        "train.checkpoint_every_steps=3", "log.progress=lines"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fmnist(tmp_path_factory.mktemp("elastic_fmnist"), 384, 100)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(data: Path, run: Path, max_restarts: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", str(max_restarts),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
           "-m", "visionzoo", "train", "fashion_mnist", "--data", str(data), "--output", str(run),
           "--resume", "auto", *ARGS]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _worker(agent: int, rank: int) -> int | None:
    """The pid of the agent's worker process with RANK=rank."""
    try:
        children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    except FileNotFoundError:
        return None
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail("the job hung:\n" + out[-3000:])
    return out


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("elastic") / "ref"
    proc = _torchrun(data, run, max_restarts=0)
    out = _finish(proc, 600)
    assert proc.returncode == 0, out[-3000:]
    return run


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc")
@pytest.mark.parametrize("rank", [1, 0])
def test_a_killed_worker_is_replaced_and_the_run_resumes(data, reference, tmp_path, rank):
    run = tmp_path / "run"
    proc = _torchrun(data, run, max_restarts=1)
    try:
        deadline = time.time() + 300
        while not checkpoint_pairs(run):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.time() < deadline, "no checkpoint was written"
            time.sleep(0.05)
        victim = _worker(proc.pid, rank)
        assert victim is not None and not (run / "results.json").exists()
        os.kill(victim, signal.SIGKILL)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    out = _finish(proc, 600)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming" in out and "at epoch" in out  # the new round continued the run
    ref, got = json.loads((reference / "results.json").read_text()), json.loads((run / "results.json").read_text())
    assert (got["steps"], got["Acc@1"], got["ranks_in_sync"]) == (ref["steps"], ref["Acc@1"], True)
    a, b = load_file(reference / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exact resume
