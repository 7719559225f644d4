"""Multi-process training on the CPU with gloo, through visionzoo's own launcher (torch's
elastic agent): same results as one process, exact validation, a dead worker ends the job."""

from __future__ import annotations

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

from conftest import write_fmnist
from visionzoo.cli import main
from visionzoo.config import for_world_size, load_config, peak_lr
from visionzoo.errors import UserError
from visionzoo.run_folder import read_metrics

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def odd_fmnist(tmp_path_factory) -> Path:
    """IDX files with 256 train and 201 test images: 201 does not split evenly over 2 ranks."""
    return write_fmnist(tmp_path_factory.mktemp("odd_fmnist"), 256, 201)


def test_global_batch_is_split_and_recorded():
    cfg = for_world_size(load_config("resnet50_cifar100"), 8)
    assert (cfg.data.batch_size, cfg.data.batch_size_per_device, cfg.optim.lr) == (128, 16, 0.1)
    with pytest.raises(UserError, match="does not split"):
        for_world_size(load_config("resnet50_cifar100"), 3)


def test_per_device_batch_scales_lr_linearly():
    cfg = for_world_size(load_config("resnet50_cifar100", ["data.batch_size_per_device=32"]), 8)
    assert (cfg.data.batch_size, cfg.data.batch_size_per_device) == (256, 32)
    assert cfg.optim.lr == 0.1 and cfg.optim.lr_batch == 128  # the recipe's LR and the batch it is for
    assert peak_lr(cfg) == 0.1 * 256 / 128
    again = for_world_size(cfg, 8)  # resolving a resolved config (a resumed run's) changes nothing
    assert (again.data.batch_size, again.optim.lr_batch, peak_lr(again)) == (256, 128, peak_lr(cfg))


@pytest.mark.parametrize("recipe, overrides, devices, want", [
    ("resnet50_cifar100", [], 8, 0.1),  # the recipe's global batch: its LR
    ("resnet50_cifar100", ["data.batch_size_per_device=32", "optim.lr_scaling=none"], 8, 0.1),
    ("resnet50_cifar100", ["optim.lr_scaling=per256"], 1, 0.1 * 128 / 256),
    ("dino_vits16_imagenet", [], 8, 5e-4 * 512 / 256),  # per 256 images, as main_dino.py
    ("dino_vits16_imagenet", ["data.batch_size_per_device=64"], 2, 5e-4 * 128 / 256),
    ("dino_fashion_mnist", [], 1, None),  # auto: per256 for task=dino
])
def test_one_lr_rule_for_every_task(recipe, overrides, devices, want):
    cfg = for_world_size(load_config(recipe, overrides), devices)
    if want is None:
        want = cfg.optim.lr * cfg.data.batch_size / 256
    assert peak_lr(cfg) == pytest.approx(want, rel=1e-15)


# No augmentation and GroupNorm: a step on 2 devices is then the same computation as on one.
# A checkpoint after every step, to compare the weights after the first one. In float64
# (train.amp=fp64): the 2-rank gradient is summed in another order, and later steps amplify that
# round-off (in float32, 1e-4 relative in epoch 1's loss on an AVX512 CPU, 5e-8 with AVX2); from
# float64's 1e-16 the same growth stays far below every tolerance here, on any instruction set.
EXACT = ["--epochs", "2", "--device", "cpu", "--workers", "0", "data.batch_size=32", "data.augment=none",
         "data.hflip=0", "model.kwargs.norm=gn", "train.log_every=0", "optim.lr=0.02", "train.amp=fp64",
         "train.checkpoint_every_steps=1", "train.keep_checkpoints=100"]


def _run(tmp_path: Path, name: str, data: Path, extra: list[str]) -> tuple[dict, list[dict]]:
    run = tmp_path / name
    argv = ["train", "fashion_mnist", "--data", str(data), "--output", str(run), *EXACT, *extra]
    # One OpenMP thread in every process of both runs: a different thread count sums in a different
    # order, which is a difference of the machine, not of the distributed code under test.
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "visionzoo", *argv], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    return results, [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "epoch"]


@pytest.mark.parametrize("resident", ["true", "false"])
def test_two_processes_match_one(odd_fmnist, tmp_path, resident, capsys):
    extra = [f"data.device_resident={resident}"]
    one, one_epochs = _run(tmp_path, "one", odd_fmnist, extra)
    two, two_epochs = _run(tmp_path, "two", odd_fmnist, ["--devices", "2", *extra])
    assert two["devices"] == 2 and two["ranks_in_sync"] is True
    assert not (tmp_path / "two" / "rank1").exists()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    # The first global step is the same computation on 1 and 2 ranks: the weights after it agree
    # to float64 round-off of the gradient sum (a wrong shard, scaling or reduction is off by >1e-3).
    first = "checkpoints/step-000000001.safetensors"
    w1, w2 = load_file(tmp_path / "one" / first), load_file(tmp_path / "two" / first)
    for k in w1:
        assert w1[k].dtype == torch.float64
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-12, msg=k)
    # Every epoch's losses, to float64 round-off amplified over the run's steps.
    assert len(one_epochs) == len(two_epochs) == 2
    for a, b in zip(one_epochs, two_epochs, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-9)
    assert abs(two["Acc@1"] - one["Acc@1"]) <= 1.0
    # Exact validation: the 2-rank Acc@1 over 201 images is what one process measures on the same weights.
    assert main(["eval", str(tmp_path / "two"), "--data", str(odd_fmnist), "--device", "cpu", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert f"Acc@1 {two['Acc@1']:.2f}%" in out and "(201 images" in out


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


def test_killing_a_worker_ends_the_job(tmp_path):
    run = tmp_path / "killed"
    argv = ["train", "fashion_mnist", "--data", "synthetic", "--devices", "2", "--epochs", "100000", "--device", "cpu",
            "--output", str(run), "train.log_every=1", "data.batch_size=8", "data.synthetic_samples=64"]
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "visionzoo", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline, "training never started"
            time.sleep(0.5)
        workers = _children(proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.time()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert time.time() - t0 < 120
        assert "worker rank" in err and "failed" in err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_an_error_every_rank_meets_is_said_once(tmp_path):
    """A run that diverges on 2 ranks (both read the same all-reduced NaN flag): one line from rank
    0 and exit 2, as with one process. Before: the line once per rank, torch's agent's
    "failed (exitcode: 2) local_rank: 0 ..." log, "worker rank 0 failed (exit code 2); the other
    workers were stopped" and exit 1."""
    run = tmp_path / "diverged"
    argv = ["train", "fashion_mnist", "--data", "synthetic", "--devices", "2", "--epochs", "1", "--device", "cpu",
            "--output", str(run), "optim.lr=1e30", "train.log_every=1", "data.batch_size=16",
            "data.synthetic_samples=512", "log.progress=off"]
    proc = subprocess.run([sys.executable, "-m", "visionzoo", *argv], env={**os.environ, "PYTHONPATH": SRC},
                          capture_output=True, text=True, timeout=300)
    status = json.loads((run / "status.json").read_text())
    assert proc.returncode == 2 and status["status"] == "failed", proc.stderr[-2000:]
    line = status["error"].removeprefix("UserError: ")
    assert line.startswith("the loss became NaN/inf by epoch 1, step ") and "training diverged" in line
    assert proc.stderr.splitlines() == [f"visionzoo: error: {line}"]


@pytest.mark.parametrize("argv, line", [
    (["fashion_mnist", "--devices", "3", "data.batch_size=20"],
     "data.batch_size=20 (global) does not split into 3 device(s) x 1 accumulation step(s); set "
     "data.batch_size_per_device instead"),
    (["dino_fashion_mnist", "--devices", "2", "train.ema_decay=0.9"],
     "task=dino does not use train.ema_decay=0.9 (they are for supervised training; DINO's teacher is its own "
     "EMA): leave them at 0"),
    (["fashion_mnist", "--devices", "2", "data.batch_size=32", "model.bn_group=7"],
     "model.bn_group=7 does not divide the batch per device and micro-step (16 = data.batch_size 32 / 2 device(s) / "
     "train.accum_steps 1): its last group would hold 2 image(s); choose a data.batch_size whose share per device "
     "is a multiple of 7"),
], ids=["batch", "dino", "bn_group"])
def test_a_config_the_workers_would_refuse_is_refused_once_before_they_start(argv, line, tmp_path, capsys,
                                                                             monkeypatch):
    """Before: each of the N workers started, imported torch, refused the same config and printed
    the same line (N lines, then the launcher's "worker rank 0 failed", exit 1)."""
    import visionzoo
    from visionzoo import distributed

    monkeypatch.setattr(distributed, "launch_local", lambda *a, **k: pytest.fail("workers were started"))
    assert main(["train", *argv[:3], "--data", "synthetic", "--device", "cpu", "--output", str(tmp_path / "r"),
                 *argv[3:]]) == 2
    assert capsys.readouterr().err == f"visionzoo: error: {line}\n"
    with pytest.raises(UserError, match=line.split(" (")[0].replace(".", r"\.")):  # the Python API alike
        visionzoo.train(argv[0], data="synthetic", devices=int(argv[2]), device="cpu", output=str(tmp_path / "a"),
                        **dict(a.replace(".", "__", 1).split("=") for a in argv[3:]))
