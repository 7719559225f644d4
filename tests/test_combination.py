"""Features in combination (issue 32): each test names the item it holds, and each failed on the
code before the fix (the numbers are in the test's comments). The launcher, tracker-credential,
mmcv-normalisation and epoch warm-up items live beside their subjects (test_faults_signals.py,
test_trackers.py, test_any_device_count.py), the predict and report items in test_api.py and
test_report_page.py; the combination matrix over tasks, launchers and features is
tests/test_matrix.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from conftest import StopAfter, start_ranks, write_fmnist
from visionzoo.cli import main
from visionzoo.config import for_world_size, from_dict, load_config
from visionzoo.engine import lockstep
from visionzoo.engine.tasks.base import Batch, RunEnv
from visionzoo.engine.tasks.classify import ClassifyTask
from visionzoo.errors import UserError

CPU = torch.device("cpu")
FAST = ["--device", "cpu", "--amp", "none", "log.progress=off", "data.batch_size=32", "train.log_every=1"]


# ----------------------------------------------------------------------------- 1, 7: the placeholder forward

class RecordingSyncBN(nn.SyncBatchNorm):
    """SyncBatchNorm that records its forwards (mode, rows) instead of communicating."""

    calls: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        RecordingSyncBN.calls.append((self.training, x.shape[0]))
        return x


def test_1_syncbn_joins_the_zero_weight_step_in_training_mode():
    """Before: the placeholder forward ran in eval mode, where SyncBatchNorm skips the all-gather
    and all-reduce the other ranks make (their next collective then paired with DDP's bucket
    all-reduce). Now it runs in training mode on zero rows, which SyncBatchNorm counts as no image."""
    net = nn.Sequential(nn.Conv2d(3, 4, 1), RecordingSyncBN(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    RecordingSyncBN.calls = []
    rows = lockstep.placeholder_rows(net)
    loss = lockstep.zero_weight_loss(net, net, lockstep.placeholder((3, 8, 8), CPU, rows=rows))
    loss.backward()
    assert RecordingSyncBN.calls == [(True, 0)] and loss.item() == 0.0 and net.training


def test_1_plain_batchnorm_keeps_its_statistics_on_the_placeholder():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    lockstep.zero_weight_loss(net, net, lockstep.placeholder((3, 8, 8), CPU, rows=lockstep.placeholder_rows(net)))
    after = net.state_dict()
    assert lockstep.placeholder_rows(net) == 2 and net.training
    assert torch.equal(after["1.running_mean"], before["1.running_mean"])
    assert torch.equal(after["1.running_var"], before["1.running_var"])
    assert after["1.num_batches_tracked"] == before["1.num_batches_tracked"] + 1  # as on the ranks with images


def test_7_dino_teacher_statistics_do_not_move_on_the_placeholder():
    """Before: the teacher ran its placeholder forward in training mode: its BatchNorm running
    statistics (dino.use_bn_in_head) moved on all-zero images (mean 0.0 -> 0.0 but var 1 -> 0.9)."""
    from test_dino import TINY_OVERRIDES
    from visionzoo.engine.tasks.dino import DinoTask

    cfg = for_world_size(load_config("dino_fashion_mnist", [*TINY_OVERRIDES, "dino.use_bn_in_head=true"]), 1)
    task = DinoTask(cfg, RunEnv(CPU, None))
    task.steps_per_epoch = 1
    task.build()
    task.train()
    bn = [k for k in task.teacher.state_dict() if "running" in k]
    before = {k: task.teacher.state_dict()[k].clone() for k in bn}
    task.set_step(0, 0)
    task.placeholder_loss().backward()
    task.after_update(Batch(0))
    assert bn and all(torch.equal(task.teacher.state_dict()[k], before[k]) for k in bn)
    assert task.teacher.training  # left as it was


# ----------------------------------------------------------------------------- 2: a run that is still training

def _hold(run: Path) -> subprocess.Popen:
    """Another process training ``run``: it holds the run's lock and says running in status.json."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from visionzoo.run_folder import RunLock, mark_status;"
            "from pathlib import Path; lock = RunLock(Path(sys.argv[1])); assert lock.acquire();"
            "mark_status(Path(sys.argv[1]), 'running'); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run), str(Path(__file__).parents[1] / "src")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_2_resume_auto_never_joins_a_run_that_is_training(fmnist_dir, tmp_path, monkeypatch, capsys):
    """Before: --resume auto took the newest unfinished run, also while another job trained it
    (epochs interleaved in metrics.jsonl). Now: skipped and named; an explicit --resume or
    --output of it is refused in one line."""
    import visionzoo.engine.run as run_engine

    monkeypatch.chdir(tmp_path)
    args = ["train", "fashion_mnist", "--data", str(fmnist_dir), "--epochs", "1", *FAST]
    for name in ("older", "newer"):  # two stopped runs of the recipe
        with monkeypatch.context() as m:
            m.setattr(run_engine, "StopSignal", StopAfter(3))
            assert main([*args, "--output", f"runs/{name}"]) == 143
        time.sleep(1.1)  # status.json times tell them apart
    holder = _hold(tmp_path / "runs" / "newer")
    try:
        capsys.readouterr()
        assert main([*args, "--resume", "auto"]) == 0
        out = capsys.readouterr().out
        assert "--resume auto: continuing runs/older, the newest unfinished fashion_mnist run in runs/ " \
               f"(skipped, still training: runs/newer (pid {holder.pid} on " in out
        assert main([*args, "--resume", "runs/newer"]) == 2
        err = capsys.readouterr().err
        assert f"--resume runs/newer: the run is being trained by another process (pid {holder.pid} on" in err
        assert err.count("\n") == 1
        assert main([*args, "--resume", "auto", "--output", "runs/newer"]) == 2
        assert "--resume auto: runs/newer is being trained by another process" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert main([*args, "--resume", "auto", "--output", "runs/newer"]) == 0  # free again: it continues
    assert json.loads(Path("runs/newer/results.json").read_text())["steps"] == 20


# ----------------------------------------------------------------------------- 3: EMA and the run folder

def test_3_the_run_folders_model_is_the_one_its_results_measured(fmnist_dir, tmp_path, capsys):
    """Before: results.json measured the EMA, model.safetensors held the raw weights that eval,
    export, infer and the report load (reproduced: results 30.0%, eval 16.5%)."""
    run = tmp_path / "ema"
    assert main(["train", "fashion_mnist", "--data", str(fmnist_dir), "--epochs", "1", "--output", str(run), *FAST,
                 "train.ema_decay=0.8", "train.max_steps_per_epoch=6"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["weights"] == "ema (train.ema_decay=0.8)"
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(fmnist_dir), "--device", "cpu", "--amp", "none"]) == 0
    assert f"Acc@1 {results['Acc@1']:.2f}%" in capsys.readouterr().out
    ema, trained = load_file(str(run / "model.safetensors")), load_file(str(run / "model_no_ema.safetensors"))
    assert any(not torch.equal(ema[k], trained[k]) for k in ema if ema[k].is_floating_point())
    from visionzoo.checkpoint import read_metadata

    assert read_metadata(run / "model.safetensors")["weights"] == "ema"
    assert read_metadata(run / "model_no_ema.safetensors")["weights"] == "trained"


# ----------------------------------------------------------------------------- 5, 9: grouped BatchNorm

def test_5_timm_batchnormact_layers_are_grouped_as_batchnorm():
    """Before: timm's BatchNormAct2d (densenet, efficientnet) was left alone: 0 layers grouped
    while the header and results said "BatchNorm over 16"."""
    import timm
    from timm.layers import BatchNormAct2d

    from visionzoo.models.ghost_bn import grouped_layers, use_bn_groups

    net = timm.create_model("test_efficientnet", num_classes=5)
    kinds = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert any(isinstance(m, BatchNormAct2d) for m in net.modules())
    assert use_bn_groups(net, 2) == kinds == len(grouped_layers(net))
    # One layer: its groups are normalised as separate BatchNormAct2d forwards, activation included.
    torch.manual_seed(0)
    layer = BatchNormAct2d(3, act_layer=nn.ReLU)
    reference = [BatchNormAct2d(3, act_layer=nn.ReLU) for _ in range(2)]
    for r in reference:
        r.load_state_dict(layer.state_dict())
    use_bn_groups(layer, 4)
    x = torch.randn(8, 3, 5, 5)
    want = torch.cat([r(x[i * 4:(i + 1) * 4]) for i, r in enumerate(reference)])
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    assert torch.equal(layer.running_mean, reference[0].running_mean)  # the first group's (rank 0's)


def test_5_a_batchnorm_kind_that_cannot_be_grouped_is_refused():
    from visionzoo.models.ghost_bn import use_bn_groups

    class OwnBN(nn.BatchNorm2d):
        pass

    with pytest.raises(UserError, match=r"model.bn_group=4: the network's OwnBN layers cannot be grouped"):
        use_bn_groups(nn.Sequential(nn.Conv2d(3, 3, 1), OwnBN(3)), 4)


def test_5_the_header_says_how_many_layers_were_grouped(fmnist_dir, tmp_path, capsys):
    assert main(["train", "fashion_mnist", "--data", str(fmnist_dir), "--epochs", "1", "--output", str(tmp_path / "r"),
                 *FAST, "model.bn_group=8", "train.max_steps_per_epoch=2"]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert f"batch 32, BatchNorm over 8 ({results['BN layers grouped']} layers grouped)" in out
    assert results["BN group"] == 8 and results["BN layers grouped"] > 0


def test_9_a_batch_that_does_not_split_into_groups_is_refused_at_start(fmnist_dir, tmp_path, capsys):
    """Before: a last group of one image crashed mid-training ("Expected more than 1 value per channel")."""
    assert main(["train", "fashion_mnist", "--data", str(fmnist_dir), "--output", str(tmp_path / "r"), *FAST,
                 "data.batch_size=33", "model.bn_group=16"]) == 2
    assert capsys.readouterr().err == (
        "visionzoo: error: model.bn_group=16 does not divide the batch per device and micro-step (33 = "
        "data.batch_size 33 / 1 device(s) / train.accum_steps 1): its last group would hold 1 image(s); choose a "
        "data.batch_size whose share per device is a multiple of 16\n")


def _grouped_task(group: int, batch: int, mixup: float = 0.0) -> ClassifyTask:
    cfg = for_world_size(from_dict({
        "recipe": "groups", "data": {"batch_size": batch, "in_chans": 1, "mean": [0.0], "std": [1.0]},
        "model": {"name": "small_cnn", "library": "visionzoo", "kwargs": {"width": 4}, "bn_group": group,
                  "channels_last": False}, "train": {"amp": "none", "mixup": mixup}}), 1)
    task = ClassifyTask(cfg, RunEnv(CPU, None))
    task.classes, task.steps_per_epoch = [str(i) for i in range(10)], 1
    task.build()
    return task


def test_9_groups_stay_aligned_when_images_drop():
    """Before: one unreadable image shifted every later group by one image, off the reference's
    ranks. Now each group keeps the rest of its rank's images; a group left with one image joins
    the one before (no crash)."""
    from visionzoo.data.sources.folder import Unreadable

    task = _grouped_task(group=4, batch=12)
    images, targets = torch.rand(12, 1, 28, 28), torch.arange(12) % 10
    keep = [i for i in range(12) if i not in (1, 9, 10)]  # three unreadable: positions 1, 9 and 10
    task.prepare((images[keep], targets[keep], Unreadable(3, (), (1, 9, 10))))
    assert all(m.sizes == [3, 4, 2] for m in task.grouped)
    keep = list(range(8))
    task.prepare((images[keep], targets[keep], Unreadable(4, (), (8, 9, 10, 11))))
    assert all(m.sizes == [4, 4] for m in task.grouped)  # the emptied group is gone
    keep = [i for i in range(12) if i not in (8, 9, 10)]
    batch = task.prepare((images[keep], targets[keep], Unreadable(3, (), (8, 9, 10))))
    assert all(m.sizes == [4, 5] for m in task.grouped)  # a one-image group joins the one before
    task.train()
    task.set_step(0, 0)
    loss, _ = task.loss(batch, 0)  # trains: no "Expected more than 1 value per channel"
    assert torch.isfinite(loss)
    task.prepare((images, targets, Unreadable(0, (), ())))
    assert all(m.sizes is None for m in task.grouped)  # a whole batch: bn_group images per group
    mixing = _grouped_task(group=4, batch=12, mixup=0.5)
    keep = [i for i in range(12) if i != 2]
    out = mixing.prepare((images[keep], targets[keep], Unreadable(1, (), (2,))))
    assert out.n == 10 and all(m.sizes == [3, 4, 3] for m in mixing.grouped)  # mixup drops one more, at the end


# ----------------------------------------------------------------------------- 10: trackers across resumes

def test_10_a_resumed_run_continues_its_mlflow_and_wandb_runs(fmnist_dir, tmp_path, monkeypatch):
    """Before: every resume opened a new MLflow and W&B run (a job requeued N times was N runs)."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    import visionzoo.engine.run as run_engine

    monkeypatch.chdir(tmp_path)  # a sqlite store puts its artifacts in ./mlruns of where it was made
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    run = tmp_path / "run"
    args = ["train", "fashion_mnist", "--data", str(fmnist_dir), "--epochs", "1", *FAST, f"log.mlflow_uri={uri}",
            "log.wandb=true", "train.max_steps_per_epoch=6"]
    with monkeypatch.context() as m:
        m.setattr(run_engine, "StopSignal", StopAfter(3))
        assert main([*args, "--output", str(run)]) == 143
    ids = json.loads((run / "trackers.json").read_text())
    assert main([*args, "--resume", str(run), f"log.mlflow_uri={uri}"]) == 0
    assert json.loads((run / "trackers.json").read_text()) == ids
    client = MlflowClient(tracking_uri=uri)
    (only,) = client.search_runs([client.get_experiment_by_name("visionzoo").experiment_id])
    assert only.info.run_id == ids["mlflow"] and only.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(only.info.run_id, "step/loss")] == [1, 2, 3, 4, 5, 6]
    offline = [p.name for p in (tmp_path / "wandb" / "wandb").glob("offline-run-*")]
    assert len(offline) == 2 and all(name.endswith(ids["wandb"]) for name in offline)  # two sessions, one run


# ----------------------------------------------------------------------------- 11: a failure on rank 0 ends every rank

@pytest.mark.parametrize("fault", ["partial write that cannot be removed", "metrics.jsonl that cannot be read"])
def test_11_a_filesystem_error_on_rank_0_while_resuming_ends_every_rank_at_once(tmp_path, fault):
    """Before: rank 0 raised before its broadcast and rank 1 waited train.dist_timeout (here 60 s)
    in its next collective. Now both end within seconds (exit 2), rank 0 with the one line."""
    (tmp_path / "fm").mkdir()
    data = write_fmnist(tmp_path / "fm", 64, 20)
    run = tmp_path / "run"
    common = [sys.executable, "-m", "visionzoo", "train", "fashion_mnist", "--data", str(data), "--device", "cpu",
              "--amp", "none", "--epochs", "1", "data.batch_size=16", "log.progress=off", "train.dist_timeout=60"]
    ranks = start_ranks(lambda r: [*common, "--output", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert all(p.wait(timeout=180) == 0 for p in ranks)
    (run / "results.json").unlink()
    if fault.startswith("partial"):  # a write killed mid-way left a .step-* that is a folder here
        (run / "checkpoints" / ".step-000000009.safetensors").mkdir()
        (run / "checkpoints" / ".step-000000009.safetensors" / "x").write_text("x")
        want = "cannot resume from"
    else:
        (run / "metrics.jsonl").unlink()
        (run / "metrics.jsonl").mkdir()
        want = "cannot write the run folder"
    t0 = time.monotonic()
    ranks = start_ranks(lambda r: [*common, "--resume", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    errs = [p.communicate(timeout=120)[1] for p in ranks]
    assert time.monotonic() - t0 < 45, errs  # far below train.dist_timeout
    assert [p.returncode for p in ranks] == [2, 2], errs
    # Rank 0 says it in one line; rank 1 met the same error and exits quietly.
    assert errs[0].startswith(f"visionzoo: error: {want}") and errs[0].count("\n") == 1 and errs[1] == "", errs


# ----------------------------------------------------------------------------- 13: the soft-target loss in float32

def test_13_mixup_under_cpu_bf16_takes_the_loss_of_float32_logits():
    """Before: CPU autocast ran the soft-target log-softmax in bf16 (CUDA's autocast runs it in
    float32): the loss differed from float32's by ~1e-3 relative."""
    from timm.loss import SoftTargetCrossEntropy

    task = _grouped_task(group=0, batch=8, mixup=0.8)
    task.env = RunEnv(CPU, torch.bfloat16)
    task.train()
    task.set_step(0, 0)
    captured = {}
    task.model.register_forward_hook(lambda m, i, o: captured.update(logits=o))
    images = torch.rand(8, 1, 28, 28)
    np.random.seed(0)  # timm's Mixup draws from NumPy
    loss, _ = task.loss(task.prepare((images.clone(), torch.arange(8), 0)), 0)
    assert loss.dtype == torch.float32 and captured["logits"].dtype == torch.bfloat16
    np.random.seed(0)  # the targets mixup made, from the same draws
    _, soft = task.mixup(images.clone(), torch.arange(8))
    assert torch.equal(loss, SoftTargetCrossEntropy()(captured["logits"].float(), soft))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loss before: its log-softmax in bf16
        before = SoftTargetCrossEntropy()(captured["logits"], soft)
    assert not torch.equal(before, loss)
