"""Tar shards and parquet written by `visionzoo data pack` from real JPEGs: deterministic packing,
verify, every sample once per epoch over ranks and workers, exact validation, resume mid-epoch,
and training from local shards, over HTTP, from parquet and from a save_to_disk folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_FOLDER_RECIPE
from visionzoo.cli import main
from visionzoo.config import DataConfig
from visionzoo.data.augment.presets import eval_transform
from visionzoo.data.loading.build import build_datasets
from visionzoo.data.loading.samplers import SampleOrder
from visionzoo.data.loading.stream_loader import StreamLoader
from visionzoo.data.sources.folder import load_image
from visionzoo.run_folder import read_metrics

SRC = str(Path(__file__).resolve().parents[1] / "src")
# Images used whole (no crop, no flip), so a batch's tensors identify its samples.
PLAIN = dict(image_size=20, augment="none", hflip=0.0, test_resize=0, test_size=20, mean=[128.0] * 3, std=[64.0] * 3)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest()


def _members(folder: Path, prefix: str) -> dict[str, bytes]:
    """key → JPEG bytes of every sample in folder/prefix-*.tar, read with tarfile."""
    out = {}
    for shard in sorted(folder.glob(f"{prefix}-*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    out[f"{shard.name}:{m.name[:-4]}"] = tf.extractfile(m).read()
    return out


def _decoded_ids(folder: Path, prefix: str) -> dict[str, str]:
    """digest of the decoded, normalised image → key, for every sample of a split (items are
    uint8; loaders normalise each batch, as ``t.normalize`` does here)."""
    t = eval_transform(DataConfig(**PLAIN))
    return {_digest(t.normalize(load_image(b, t))): k for k, b in _members(folder, prefix).items()}


# --------------------------------------------------------------------------------- data pack
def test_pack_is_byte_identical_and_the_manifest_counts(jpeg_tree, wds_dir, tmp_path):
    again = tmp_path / "again"
    assert main(["data", "pack", str(jpeg_tree), str(again), "--shard-samples", "5", "--workers", "2"]) == 0
    files = sorted(p.name for p in wds_dir.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    assert len([f for f in files if f.startswith("train-")]) == 10
    assert len([f for f in files if f.startswith("val-")]) == 3
    for name in files:  # two packs, one with 2 encoding workers: the same bytes
        assert (wds_dir / name).read_bytes() == (again / name).read_bytes(), name
    manifest = json.loads((wds_dir / "manifest.json").read_text())
    assert manifest["classes"] == ["c0", "c1", "c2", "c3"]
    assert (wds_dir / "classes.txt").read_text().split() == manifest["classes"]
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (train["samples"], train["per_class"], val["samples"], val["per_class"]) == (48, [12] * 4, 14, [4, 4, 3, 3])
    for s in train["shards"] + val["shards"]:
        data = (wds_dir / s["name"]).read_bytes()
        assert (s["bytes"], s["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        with tarfile.open(wds_dir / s["name"]) as tf:
            members = tf.getmembers()
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "visionzoo", 0o444)}
        labels = [int(tf_bytes) for tf_bytes in _labels(wds_dir / s["name"])]
        assert [labels.count(k) for k in range(4)] == s["per_class"] and sum(s["per_class"]) == s["samples"]
    # Training samples are shuffled once (shards mix classes); validation keeps the sorted order.
    assert len({k for k, n in enumerate(train["shards"][0]["per_class"]) if n}) > 1
    assert val["shards"][0]["per_class"] == [4, 1, 0, 0]


def _labels(shard: Path) -> list[bytes]:
    with tarfile.open(shard) as tf:
        return [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".cls")]


def test_verify_passes_then_names_a_modified_shard(wds_dir, tmp_path, capsys):
    assert main(["data", "verify", str(wds_dir), "--deep"]) == 0
    assert "all 13 shard(s) match" in capsys.readouterr().out
    copy = tmp_path / "copy"
    shutil.copytree(wds_dir, copy)
    data = bytearray((copy / "train-000004.tar").read_bytes())
    data[700] ^= 0xFF  # one byte inside the first image
    (copy / "train-000004.tar").write_bytes(bytes(data))
    assert main(["data", "verify", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train-000004.tar (sha256 differs)" in err and "1 of 13" in err


def test_pack_resize_reencodes_the_short_side(jpeg_tree, tmp_path):
    out = tmp_path / "small"
    assert main(["data", "pack", str(jpeg_tree), str(out), "--resize", "12", "--shard-size", "4KB"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["resize"] == 12 and manifest["options"]["shard_size"] == 4096
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 1 and all(s["bytes"] <= 4096 + 10240 for s in shards)  # + the end-of-archive padding
    for img in _members(out, "train").values():
        with Image.open(__import__("io").BytesIO(img)) as im:
            assert im.format == "JPEG" and min(im.size) == 12


def test_pack_idx_and_cifar_sources_as_parquet(fmnist_dir, cifar100_dir, tmp_path):
    import datasets
    import pyarrow.parquet as pq

    for src, n_classes, n_train in ((fmnist_dir, 10, 640), (cifar100_dir.parent, 100, 200)):
        out = tmp_path / src.name
        assert main(["data", "pack", str(src), str(out), "--format", "hfds"]) == 0
        files = sorted((out / "data").glob("train-*.parquet"))
        assert [f.name for f in files] == ["train-00000-of-00001.parquet"]
        features = datasets.Features.from_arrow_schema(pq.read_schema(files[0]))
        assert len(features["label"].names) == n_classes and isinstance(features["image"], datasets.Image)
        table = pq.read_table(files[0])
        assert table.num_rows == n_train
        with Image.open(__import__("io").BytesIO(table.column("image")[0].as_py()["bytes"])) as im:
            assert im.format == "PNG"


# ------------------------------------------------------------------- the guarantees, in-process
def _train_stream(wds_dir: Path, **kw):
    d = DataConfig(name="webdataset", path=str(wds_dir), **{**PLAIN, "shuffle_buffer": 6, **kw})
    return build_datasets(d, train=True)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (11, 0)])  # 11 ranks > 10 shards: shared shards
def test_each_training_sample_once_per_epoch_and_skip_is_exact(wds_dir, world, workers, capsys):
    splits = _train_stream(wds_dir)
    ids = {hashlib.sha1(b).hexdigest(): k for k, b in _members(wds_dir, "train").items()}
    batch = 2
    usable = 48 // (world * batch) * world * batch

    # One loader per rank for every pass: persistent workers must follow set_epoch.
    loaders = [StreamLoader(splits.train.as_bytes(), batch, workers, True,
                            SampleOrder(seed=3, rank=r, world_size=world), collate=list) for r in range(world)]

    def epoch(e: int, skip: int = 0) -> list[list[list[str]]]:
        ranks = []
        for loader in loaders:
            loader.set_epoch(e, skip)
            batches = [[ids[hashlib.sha1(item[0].numpy().tobytes()).hexdigest()] for item in b] for b in loader]
            assert len(batches) == len(loader) == max(usable // (world * batch) - skip, 0)
            ranks.append(batches)
        return ranks

    first = epoch(0)
    keys = [k for rank in first for b in rank for k in b]
    assert len(keys) == len(set(keys)) == usable  # every sample at most once, all but the remainder
    assert epoch(0) == first  # a pass is a function of (seed, epoch)
    second = epoch(1)
    assert sorted(k for rank in second for b in rank for k in b) != sorted(keys) or second != first
    for skip in (1, 3, 5):  # resuming after `skip` batches gives exactly the rest of the epoch (or nothing)
        assert epoch(0, skip) == [rank[skip:] for rank in first]
    warned = "workers share shards" in capsys.readouterr().err
    assert warned == (10 < world * max(min(workers, os.cpu_count() or 1), 1))


@pytest.mark.parametrize("world,workers", [(1, 0), (3, 2)])
def test_validation_reads_every_sample_once(wds_dir, world, workers):
    splits = _train_stream(wds_dir)
    ids = _decoded_ids(wds_dir, "val")
    seen = []
    for r in range(world):
        loader = StreamLoader(splits.val, 4, workers, False, SampleOrder(rank=r, world_size=world))
        batches = list(loader)
        assert len(batches) == len(loader)
        norm = splits.val.transform.normalize  # a bare StreamLoader hands over uint8 batches
        seen += [ids[_digest(norm(img))] for images, _, n_bad in batches for img in images]
    assert sorted(seen) == sorted(ids.values()) and len(seen) == 14


_RANK_SCRIPT = r"""
import hashlib, json, sys
import torch
from visionzoo import distributed
from visionzoo.config import DataConfig
from visionzoo.data.sources import folder
from visionzoo.data.loading.build import build_datasets, build_loaders
from visionzoo.data.loading.build import set_loader_epoch
from visionzoo.data.loading.samplers import SampleOrder

info = distributed.from_env()
distributed.init(info, torch.device("cpu"), 120)
if info.rank == 1:  # the ImageFolder file list comes from rank 0: rank 1 must not walk the tree
    def no_scan(*args):
        raise AssertionError("rank 1 scanned")
    folder._scan_class_dir = no_scan
tree = folder.ImageFolderDataset(sys.argv[2] + "/train", scan_cache=False)
d = DataConfig(**json.loads(sys.argv[3]))
splits = build_datasets(d, train=True)
train, val = build_loaders(splits, d, 4, torch.device("cpu"), SampleOrder(0, info.rank, info.world_size))
digest = lambda t: hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest()
out = {"epochs": [], "files": len(tree), "scan": tree.scan_state}
for epoch in range(2):
    set_loader_epoch(train, epoch, 0)
    out["epochs"].append([digest(img) for images, _, _ in train for img in images])
out["val"] = [digest(img) for images, _, _ in val for img in images]
json.dump(out, open(sys.argv[1], "w"))
distributed.shutdown()
"""


def test_two_gloo_processes_see_every_training_sample_once_per_epoch(wds_dir, jpeg_tree, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = json.dumps({"name": "webdataset", "path": str(wds_dir), "workers": 1, "shuffle_buffer": 6, **PLAIN})
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        argv = [sys.executable, str(script), str(tmp_path / f"r{rank}.json"), str(jpeg_tree), cfg]
        procs.append(subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2))
    ids = _decoded_ids(wds_dir, "train")
    for e in range(2):
        assert len(r0["epochs"][e]) == len(r1["epochs"][e]) == 24  # the same number of steps on both ranks
        keys = [ids[h] for h in r0["epochs"][e] + r1["epochs"][e]]
        assert sorted(keys) == sorted(ids.values())  # all 48 keys, each exactly once
    assert r0["epochs"][0] != r0["epochs"][1]  # a new order every epoch
    val_ids = _decoded_ids(wds_dir, "val")
    assert sorted(val_ids[h] for h in r0["val"] + r1["val"]) == sorted(val_ids.values())
    assert r0["files"] == r1["files"] == 48 and r0["scan"] == r1["scan"] == "scanned (cache off)"


# --------------------------------------------------------------------------------- training
def _recipe(tmp_path: Path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_FOLDER_RECIPE)
    return str(path)


def _train(tmp_path: Path, name: str, data: str, *extra: str) -> dict:
    run = tmp_path / name
    code = main(["train", _recipe(tmp_path), "--data", data, "--output", str(run), "--epochs", "2",
                 "train.deterministic=true", "log.progress=off", *extra])
    assert code == 0
    return json.loads((run / "results.json").read_text())


def test_train_from_local_shards_and_over_http_alike(wds_dir, tmp_path, monkeypatch):
    # workers 0 and 1 give the same plan (one reader per rank): here the URL is read in a worker process.
    # One loader worker costs the run a thread (runtime.cpu_threads), and another thread count sums in
    # another order: OMP_NUM_THREADS pins the count so the two runs may be compared bit for bit.
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    local = _train(tmp_path, "local", str(wds_dir), "data.name=webdataset", "--workers", "0")
    assert local["bad_images"] == 0 and local["bad_shards"] == [] and local["loader"].startswith("shard stream")
    assert local["steps"] == 2 * 48 // 4
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=wds_dir,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        remote = _train(tmp_path, "http", f"http://127.0.0.1:{port}", "data.name=webdataset", "--workers", "1")
    finally:
        server.kill()
        server.wait()
    # The same shards, counts and seed: the same batches, so the same run.
    for key in ("Acc@1", "Acc@5", "ActualLoss", "steps", "bad_images", "bad_shards"):
        assert remote[key] == local[key], key
    w_local = load_file(tmp_path / "local" / "model.safetensors")
    w_http = load_file(tmp_path / "http" / "model.safetensors")
    assert all(torch.equal(w_local[k], w_http[k]) for k in w_local)


def test_train_from_parquet_and_from_a_save_to_disk_folder(hf_dir, jpeg_tree, tmp_path):
    import datasets

    res = _train(tmp_path, "parquet", str(hf_dir), "data.name=hfds", "--workers", "0")
    assert res["bad_images"] == 0 and res["steps"] == 24 and res["Acc@1"] is not None
    # The same images as a DatasetDict written by datasets' save_to_disk (Arrow files).
    label = datasets.ClassLabel(names=["c0", "c1", "c2", "c3"])
    features = datasets.Features({"image": datasets.Image(), "label": label})

    def split(name: str) -> datasets.Dataset:
        files = sorted((jpeg_tree / name).rglob("*.jpg"))
        return datasets.Dataset.from_dict({"image": [{"bytes": f.read_bytes(), "path": f.name} for f in files],
                                           "label": [int(f.parent.name[1]) for f in files]}, features=features)

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": split("train"), "validation": split("val")}).save_to_disk(str(saved))
    res = _train(tmp_path, "arrow", str(saved), "data.name=hfds", "--workers", "0")
    assert res["bad_images"] == 0 and res["steps"] == 24


def test_eval_and_infer_read_whatever_data_holds(wds_dir, hf_dir, jpeg_tree, tmp_path, capsys):
    """A folder written by data pack is read in its own format (its manifest says which), so a
    model trained on an ImageFolder evaluates on shards and the other way round."""
    run = tmp_path / "folder"
    assert main(["train", _recipe(tmp_path), "--data", str(jpeg_tree), "--output", str(run), "log.progress=off"]) == 0
    accs = []
    for data in (jpeg_tree, wds_dir, hf_dir):
        assert main(["eval", str(run), "--data", str(data)]) == 0
        accs.append(capsys.readouterr().out.splitlines()[-1].split(": ", 1)[1])
    # The same bytes decoded the same way: the same figures, every validation image once.
    assert accs[0] == accs[1] == accs[2] and "(14 images" in accs[0]
    assert main(["export", str(run)]) == 0
    assert main(["infer", str(run / "model.onnx"), "--data", str(hf_dir)]) == 0
    result = json.loads((run / "model.infer.json").read_text())
    assert result["samples"] == 14 and result["bad_images"] == 0


def test_resume_mid_epoch_matches_the_uninterrupted_run(wds_dir, tmp_path):
    extra = ("data.name=webdataset", "--workers", "2", "data.shuffle_buffer=4", "train.checkpoint_every_steps=1",
             "train.keep_checkpoints=100", "train.log_every=1")
    _train(tmp_path, "ref", str(wds_dir), *extra)
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ref", run)
    stop = 17  # epoch 2, batch 5: an odd number of batches to skip with 2 workers
    for f in (run / "checkpoints").iterdir():
        if int(f.stem.split("-")[1]) > stop:
            f.unlink()
    for name in ("results.json", "model.safetensors", "best.safetensors", "status.json"):
        (run / name).unlink(missing_ok=True)
    assert main(["train", _recipe(tmp_path), "--data", str(wds_dir), "--output", str(run), "--epochs", "2",
                 "--resume", str(run), "train.deterministic=true", "log.progress=off", *extra]) == 0
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    stable = lambda p: [{k: v for k, v in r.items() if k not in ("time", "img_s", "epoch_time")}  # noqa: E731
                        for r in read_metrics(p / "metrics.jsonl") if r["kind"] != "resume"]
    assert stable(tmp_path / "ref") == stable(run)


def test_dino_with_device_decode_on_shards_and_knn_on_parquet(wds_dir, hf_dir, tmp_path):
    run = tmp_path / "dino"
    tiny = ["model.kwargs={img_size: 20, patch_size: 5, embed_dim: 24, depth: 1, num_heads: 3, dynamic_img_size: true}",
            "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.local_crops_number=2",
            "dino.local_crop_size=10", "data.batch_size=8", "train.epochs=1", "dino.knn_k=[5]", "dino.knn_report_k=5",
            "data.in_chans=3", "data.mean=[128,128,128]", "data.std=[64,64,64]", "data.image_size=20",
            "data.test_resize=0", "data.test_size=20", "log.progress=off", "--workers", "1"]
    assert main(["train", "dino_fashion_mnist", "--data", str(wds_dir), "--output", str(run), "data.name=webdataset",
                 "data.decode=device", *tiny]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["loader"].startswith("device decode") and res["cpu_fallbacks"] == 0 and res["steps"] == 6
    assert main(["knn", str(run), "--data", str(hf_dir), "data.name=hfds", "dino.knn_k=[5]"]) == 0
