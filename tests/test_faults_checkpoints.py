"""Resuming from a damaged run folder: a corrupt newest checkpoint is skipped with a warning that
names it, an I/O error that is not corruption stops with one line, rank 0 chooses the checkpoint
for every rank (2 gloo processes), and temporary files of a killed write are removed."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import visionzoo.checkpoint as ckpt
from conftest import start_ranks
from visionzoo.checkpoint import checkpoint_pairs, load_latest, save_checkpoint
from visionzoo.errors import UserError


def _run_with_checkpoints(run: Path, steps=(10, 20, 30)) -> None:
    """A run folder with a checkpoint pair at each of ``steps`` (a tiny network)."""
    run.mkdir(parents=True, exist_ok=True)
    net = torch.nn.Linear(3, 2)
    for step in steps:
        with torch.no_grad():
            net.weight.fill_(step)
        save_checkpoint(run, step, net, {"step": step}, {"global_step": step}, keep=10)


def test_a_truncated_newest_checkpoint_is_skipped_and_named(tmp_path, capsys):
    run = tmp_path / "run"
    _run_with_checkpoints(run)
    newest_state = checkpoint_pairs(run)[0][1]
    newest_state.write_bytes(newest_state.read_bytes()[:100])  # a crash in the middle of the write
    partial = run / "checkpoints" / ".step-000000040.pt.x1y2"  # a write that SIGKILL cut off
    partial.write_bytes(b"partial")
    tensors, state, used = load_latest(run)
    assert used.name == "step-000000020.safetensors" and state["global_step"] == 20
    assert float(tensors["weight"][0, 0]) == 20.0
    out = capsys.readouterr().out
    # Before: the fallback was silent.
    assert "warning: checkpoint step-000000030 is unusable (" in out and "resuming from step-000000020" in out
    assert not partial.exists()


def test_an_io_error_stops_instead_of_going_back(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _run_with_checkpoints(run)
    real_load = torch.load

    def failing_disk(path, *args, **kwargs):
        if Path(path).name == "step-000000030.pt":
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "load", failing_disk)
    with pytest.raises(UserError, match=r"cannot read checkpoint step-000000030 .*Input/output error.*an older "
                                        r"checkpoint is not used in its place"):
        load_latest(run)


_RANK_SCRIPT = """
import json, sys
from pathlib import Path
import torch.distributed as dist
import visionzoo.checkpoint as ckpt
dist.init_process_group("gloo")
run = Path(sys.argv[1])
if dist.get_rank() == 1:  # a stale view of the folder (e.g. a network file system's cache): only the oldest pair
    pairs = ckpt.checkpoint_pairs(run)
    ckpt.checkpoint_pairs = lambda _: pairs[-1:]
_, state, used = ckpt.load_latest(run)
json.dump({"used": used.name, "step": state["global_step"]}, open(sys.argv[2], "w"))
dist.barrier()
dist.destroy_process_group()
"""


def test_rank_0_chooses_the_checkpoint_for_every_rank(tmp_path):
    run = tmp_path / "run"
    _run_with_checkpoints(run)
    newest = checkpoint_pairs(run)[0][0]
    newest.write_bytes(newest.read_bytes()[:50])
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    procs = start_ranks(lambda rank: [sys.executable, str(script), str(run), str(tmp_path / f"r{rank}.json")],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2))
    assert r0 == r1 == {"used": "step-000000020.safetensors", "step": 20}
    assert "warning: checkpoint step-000000030 is unusable" in outs[0][0] and "warning" not in outs[1][0]
