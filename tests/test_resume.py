"""Crash safety: a run killed (SIGKILL, SIGTERM) and resumed ends bit-identical to one that
never stopped; bad checkpoints and full disks give clear errors and lose nothing."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visionzoo.checkpoint import checkpoint_pairs, load_latest
from visionzoo.cli import main
from visionzoo.run_folder import read_metrics

SRC = str(Path(__file__).resolve().parents[1] / "src")
# Deterministic CPU run that exercises every random stream: crop/flip (per batch), mixup (NumPy),
# dropout (torch), through either loader.
RUN = ["--epochs", "3", "--device", "cpu", "--workers", "0", "data.batch_size=32", "train.deterministic=true",
       "train.checkpoint_every_steps=3", "train.log_every=1", "train.mixup=0.2", "model.drop_rate=0.2"]
VOLATILE = {"time", "img_s", "epoch_time"}


def _cmd(data: Path, run: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "visionzoo", "train", "fashion_mnist", "--data", str(data), "--output", str(run),
            *RUN, *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


def _logged_steps(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.startswith('{"kind": "step"') and line.endswith("}")]
    return max(steps, default=0)


def _stable(records: list[dict]) -> list[dict]:
    """The records without times and speeds, and without the resume records that mark where each
    session of a resumed run starts (the uninterrupted run has none)."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records if r.get("kind") != "resume"]


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit-identical
    assert _stable(read_metrics(a / "metrics.jsonl")) == _stable(read_metrics(b / "metrics.jsonl"))


@pytest.mark.parametrize("resident", ["true", "false"])
def test_sigkill_at_random_steps_then_resume_is_bit_identical(fmnist_dir, tmp_path, resident):
    extra = [f"data.device_resident={resident}"]
    ref = tmp_path / "ref"
    subprocess.run(_cmd(fmnist_dir, ref, extra), env=_env(), check=True, capture_output=True, timeout=600)
    total = json.loads((ref / "results.json").read_text())["steps"]
    assert total == 60

    run = tmp_path / "killed"
    kills = 0
    for i, kill_at in enumerate((5, 26, 47)):  # in epochs 1, 2 and 3
        cmd = _cmd(fmnist_dir, run, extra + (["--resume", str(run)] if i else []))
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while proc.poll() is None and _logged_steps(run) < kill_at:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        assert checkpoint_pairs(run), "a checkpoint exists after the kill"
    assert kills >= 2
    final = subprocess.run(_cmd(fmnist_dir, run, extra + ["--resume", str(run)]), env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "resuming" in final.stdout
    _assert_same_run(ref, run)


def test_sigterm_writes_a_checkpoint_and_resume_finishes(fmnist_dir, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "term"
    extra = ["train.checkpoint_every_steps=0"]  # the only mid-epoch checkpoint is the one SIGTERM writes
    subprocess.run(_cmd(fmnist_dir, ref, extra), env=_env(), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_cmd(fmnist_dir, run, extra), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and _logged_steps(run) < 13:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    step = int(err.split("at step ")[1].split(";")[0])
    assert err.strip() == (f"visionzoo: stopped at step {step}; checkpoint saved; continue with: "
                           f"visionzoo train fashion_mnist --resume {run}")
    assert json.loads((run / "status.json").read_text())["status"] == "interrupted"
    assert checkpoint_pairs(run)[0][0].name == f"step-{step:09d}.safetensors"
    # Resumed in a process like the first (bit-exactness needs the same CPU thread count).
    resumed = subprocess.run([sys.executable, "-m", "visionzoo", "train", "fashion_mnist", "--resume", str(run)],
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(ref, run)


def test_resume_auto_picks_the_unfinished_run(fmnist_dir, tmp_path, capsys):
    run = tmp_path / "auto"
    proc = subprocess.Popen(_cmd(fmnist_dir, run, []), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and _logged_steps(run) < 10:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    argv = ["train", "fashion_mnist", "--data", str(fmnist_dir), "--output", str(run), "--resume", "auto", *RUN]
    assert main(argv) == 0
    assert "resuming" in capsys.readouterr().out
    assert json.loads((run / "results.json").read_text())["steps"] == 60


def test_truncated_newest_checkpoint_falls_back(fmnist_dir, tmp_path):
    run = tmp_path / "r"
    assert main(["train", "fashion_mnist", "--data", str(fmnist_dir), "--output", str(run), *RUN, "--epochs", "1"]) == 0
    (newest_w, newest_s), (older_w, _) = checkpoint_pairs(run)[:2]
    newest_s.write_bytes(newest_s.read_bytes()[:100])  # a kill in the middle of the write, with no rename
    (run / "checkpoints" / ".step-000000099.pt.tmp").write_bytes(b"partial")
    _, state, used = load_latest(run)
    assert used == older_w and state["global_step"] == int(older_w.stem.split("-")[1])


@pytest.mark.parametrize("content, words", [(b"", "cannot read"), (b"\x00" * 64, "cannot read")])
def test_truncated_or_foreign_weights_name_the_file(tmp_path, content, words, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    assert main(["eval", str(bad)]) == 2
    err = capsys.readouterr().err
    assert words in err and str(bad) in err


def test_disk_full_while_checkpointing_keeps_the_previous_one(fmnist_dir, tmp_path, monkeypatch, capsys):
    import visionzoo.checkpoint as ck

    real, calls = ck.save_file, {"n": 0}

    def flaky(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] >= 3:  # the third checkpoint's weights
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", flaky)
    run = tmp_path / "full"
    assert main(["train", "fashion_mnist", "--data", str(fmnist_dir), "--output", str(run), *RUN]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "is intact" in err and "step-000000006" in err
    monkeypatch.undo()
    _, state, used = load_latest(run)
    assert used.name == "step-000000006.safetensors" and state["global_step"] == 6
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp files left


def test_diverging_run_stops_with_the_last_good_checkpoint(fmnist_dir, tmp_path, capsys):
    run = tmp_path / "nan"
    assert main(["train", "fashion_mnist", "--data", str(fmnist_dir), "--output", str(run), *RUN, "optim.lr=1e12"]) == 2
    assert "became NaN/inf" in capsys.readouterr().err
    for weights, _ in checkpoint_pairs(run):
        assert all(torch.isfinite(t).all() for t in load_file(weights).values())


@pytest.mark.parametrize("allowed, code", [(2, 2), (5, 0)])
def test_nonfinite_steps_are_skipped_up_to_the_limit(fmnist_dir, tmp_path, monkeypatch, capsys, allowed, code):
    import torch.nn as nn

    real, calls = nn.CrossEntropyLoss.forward, {"n": 0}

    def sometimes_nan(self, logits, target):
        calls["n"] += 1
        loss = real(self, logits, target)
        return loss * float("nan") if calls["n"] in (4, 9, 10) else loss

    monkeypatch.setattr(nn.CrossEntropyLoss, "forward", sometimes_nan)
    run = tmp_path / "skip"
    args = ["train", "fashion_mnist", "--data", str(fmnist_dir), "--output", str(run), *RUN, "train.mixup=0",
            "--epochs", "1", f"train.skip_nonfinite={allowed}"]
    assert main(args) == code
    if code:
        assert "3 steps had a NaN/inf loss" in capsys.readouterr().err
    else:
        results = json.loads((run / "results.json").read_text())
        assert results["skipped_steps"] == 3 and results["steps"] == 20 - 3


def _fake_run(root: Path, name: str, recipe: str, mtime: float, finished: bool = False) -> Path:
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(f"recipe: {recipe}\ntask: supervised\n")
    for suffix in (".safetensors", ".pt"):
        (run / "checkpoints" / f"step-000000010{suffix}").write_bytes(b"x")
    (run / "status.json").write_text('{"status": "interrupted"}\n')
    if finished:
        (run / "results.json").write_text("{}\n")
    for p in (run / "status.json", run / "config.yaml"):
        os.utime(p, (mtime, mtime))
    return run


def test_resume_auto_finds_runs_by_their_config_whatever_their_names(tmp_path, monkeypatch, capsys):
    from visionzoo.engine.resume import find_auto_resume

    runs = tmp_path / "runs"
    _fake_run(runs, "fashion_mnist-20260101-000000", "fashion_mnist", 1000)
    wanted = _fake_run(runs, "fm3", "fashion_mnist", 2000)  # own name, the newest unfinished one
    _fake_run(runs, "fm4", "fashion_mnist", 3000, finished=True)
    _fake_run(runs, "other", "resnet50_cifar100", 4000)
    (runs / "notes").mkdir()
    assert find_auto_resume("fashion_mnist", None, str(runs)) == wanted
    assert find_auto_resume("dino_fashion_mnist", None, str(runs)) is None
    assert find_auto_resume("fashion_mnist", None, str(tmp_path / "nothing")) is None
