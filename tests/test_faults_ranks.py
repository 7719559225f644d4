"""Faults that involve ranks, with 2 gloo processes on the CPU: a shard that breaks off leaves one
rank with batches of placeholders only, and that rank still takes every step (no mixed-up
gradients, no hang); unreadable images are counted over all ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_FOLDER_RECIPE, start_ranks, write_jpeg_tree
from visionzoo.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def broken_shards(tmp_path_factory) -> Path:
    """96 training JPEGs in 4 tar shards of 24, the second cut off after 6000 bytes (about 22
    samples lost: whole batches of placeholders on whichever rank reads it)."""
    root = tmp_path_factory.mktemp("broken")
    tree = write_jpeg_tree(root / "jpegs", n_train=96, n_val=14, size=20)
    assert main(["data", "pack", str(tree), str(root / "shards"), "--shard-samples", "24"]) == 0
    shard = root / "shards" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:6000])
    (root / "tiny.yaml").write_text(TINY_FOLDER_RECIPE)
    return root


def train_2_ranks(root: Path, run: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``visionzoo train`` of the tiny recipe on the broken shards with --devices 2."""
    argv = [sys.executable, "-m", "visionzoo", "train", str(root / "tiny.yaml"), "--data", str(root / "shards"),
            "data.name=webdataset", "--devices", "2", "data.batch_size=8", "--epochs", "2", "--output", str(run),
            "train.dist_timeout=20", "log.progress=off", "data.shuffle_buffer=1", *extra]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_rank_with_only_placeholders_still_takes_every_step(broken_shards, tmp_path):
    # Before: the rank skipped its empty batches alone, and a later collective timed out. Mixup
    # also drops the last image of an odd batch: a batch of one is empty after it.
    proc = train_2_ranks(broken_shards, tmp_path / "run", "train.mixup=0.2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["steps"] == 2 * 96 // 8  # every global step, on both ranks
    assert res["ranks_in_sync"] is True  # weights and every buffer (BatchNorm counters too)
    assert res["bad_shards"] == [str(broken_shards / "shards" / "train-000001.tar")]
    # The lost samples of both epochs, whichever rank read them (summed over ranks).
    lost = res["bad_images"]
    assert 2 * 18 <= lost <= 2 * 24 and lost % 2 == 0


def test_the_ema_starts_from_the_same_weights_on_every_rank(tmp_path, capsys):
    """With optim.lr=0 the weights never move, so the EMA stays what it started from. Before, each
    rank's EMA started from its own random init (seed + rank) and each rank evaluated its own:
    the 2-rank validation loss was not the loss of the saved EMA."""
    from conftest import write_fmnist
    from visionzoo.run_folder import read_metrics

    (tmp_path / "fm").mkdir()
    data = write_fmnist(tmp_path / "fm", 64, 40)
    run = tmp_path / "ema"
    argv = [sys.executable, "-m", "visionzoo", "train", "fashion_mnist", "--data", str(data), "--devices", "2",
            "--device", "cpu", "--workers", "0", "--epochs", "1", "--output", str(run), "data.batch_size=16",
            "optim.lr=0", "train.ema_decay=0.9", "log.progress=off", "train.log_every=0"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "results.json").read_text())["ranks_in_sync"] is True  # the EMA is checked too
    val_loss = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "epoch"][-1]["val_loss"]
    assert main(["eval", str(run / "best.safetensors"), "--data", str(data), "--device", "cpu", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    one_process = float(out.split("loss ")[1].split()[0])
    assert one_process == pytest.approx(val_loss, abs=1e-4)


_KNN_SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from torch.utils.data import Dataset
from visionzoo.engine.evaluation.knn import extract_features
from visionzoo.errors import UserError
dist.init_process_group("gloo")

class Half(Dataset):  # the odd indices (rank 1's share) are unreadable files
    def __init__(self, n, good):
        self.n, self.good = n, good
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        return (torch.full((3, 4, 4), float(i)), i % 2) if self.good(i) else None

flat = lambda model, x: x.flatten(1)
out = {}
f, y = extract_features(torch.nn.Identity(), Half(6, lambda i: i % 2 == 0), 2, 0, torch.device("cpu"), fn=flat)
out["rows"], out["labels"] = f[:, 0].tolist(), y.tolist()
try:
    extract_features(torch.nn.Identity(), Half(6, lambda i: False), 2, 0, torch.device("cpu"), fn=flat)
except UserError as err:
    out["error"] = str(err)
json.dump(out, open(sys.argv[1], "w"))
dist.barrier()
dist.destroy_process_group()
"""


def test_knn_features_when_one_rank_has_no_readable_image(tmp_path):
    # Before: that rank raised alone and the other waited in the all-gather until the timeout.
    script = tmp_path / "knn.py"
    script.write_text(_KNN_SCRIPT)
    procs = start_ranks(lambda rank: [sys.executable, str(script), str(tmp_path / f"r{rank}.json")],
                        stderr=subprocess.PIPE)
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read()[-2000:]
    for rank in range(2):
        out = json.loads((tmp_path / f"r{rank}.json").read_text())
        assert out["rows"] == [0.0, 2.0, 4.0] and out["labels"] == [0, 0, 0]
        assert out["error"] == "no readable images to extract features from"  # on both ranks, no hang


def test_unreadable_validation_images_are_summed_over_ranks():
    import torch

    from visionzoo.engine.evaluation.topk import evaluate

    batches = [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), 1), (torch.empty(0), torch.empty(0), 2)]
    two_ranks = lambda t: t * 2  # noqa: E731 - what the sum over 2 ranks with the same share gives
    res = evaluate(torch.nn.Linear(3, 4), batches, torch.device("cpu"), None, reduce=two_ranks)
    assert res["samples"] == 4 and res["bad_images"] == 6  # before: this rank's 3 only


def test_device_decode_does_not_take_out_of_memory_for_bad_files(monkeypatch):
    import torch

    import visionzoo.data.loading.device_decode as dd

    calls = []

    def full_device(chunks, **kw):
        calls.append(len(chunks))
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(dd, "decode_jpeg", full_device)
    with pytest.raises(torch.OutOfMemoryError):  # before: split and retried, every image "unreadable"
        dd.decode_batch([torch.zeros(4, dtype=torch.uint8)] * 4, torch.device("cpu"))
    assert calls == [4]


def test_dino_ranks_step_together_past_a_broken_shard(broken_shards, tmp_path):
    """DINO's loop skipped a rank's empty multi-crop batch alone too (and its teacher centre then
    took rows from one rank only)."""
    tiny = ["model.kwargs={img_size: 20, patch_size: 5, embed_dim: 24, depth: 1, num_heads: 3, dynamic_img_size: true}",
            "dino.out_dim=32", "dino.hidden_dim=16", "dino.bottleneck_dim=8", "dino.local_crops_number=1",
            "dino.local_crop_size=10", "dino.knn_k=[5]", "dino.knn_report_k=5", "data.in_chans=3",
            "data.mean=[128,128,128]", "data.std=[64,64,64]", "data.image_size=20", "data.test_resize=0",
            "data.test_size=20", "--workers", "0", "--device", "cpu", "train.log_every=0"]
    argv = [sys.executable, "-m", "visionzoo", "train", "dino_fashion_mnist", "--data", str(broken_shards / "shards"),
            "data.name=webdataset", "--devices", "2", "data.batch_size=8", "--epochs", "1",
            "--output", str(tmp_path / "dino"), "train.dist_timeout=20", "log.progress=off", "data.shuffle_buffer=1",
            *tiny]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "dino" / "results.json").read_text())
    assert res["steps"] == 96 // 8 and res["ranks_in_sync"] is True
