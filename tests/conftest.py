"""Shared fixtures: small data sets written in the real on-disk formats."""

from __future__ import annotations

import atexit
import gzip
import os
import pickle
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# ImageFolder file-list caches (data/sources/scan_cache.py) go to a temporary folder, not the user's ~/.cache;
# set here, so the processes the tests launch inherit it.
if "VISIONZOO_CACHE" not in os.environ:
    os.environ["VISIONZOO_CACHE"] = tempfile.mkdtemp(prefix="visionzoo-test-cache-")
    atexit.register(shutil.rmtree, os.environ["VISIONZOO_CACHE"], True)

# A recipe file for a tiny ImageFolder: a width-4 CNN on 16 px crops, one epoch on the CPU.
TINY_FOLDER_RECIPE = """\
recipe: tiny_folder
description: a small CNN on a tiny ImageFolder
data: {name: imagefolder, batch_size: 4, workers: 0, in_chans: 3, augment: imagenet, image_size: 16,
       crop_scale: [0.5, 1.0], test_resize: 18, test_size: 16, mean: [128, 128, 128], std: [64, 64, 64]}
model: {name: small_cnn, library: visionzoo, kwargs: {width: 4}, channels_last: false}
optim: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0}
schedule: {name: cosine, warmup_epochs: 0}
train: {epochs: 1, amp: none, device: cpu, seed: 0, log_every: 1}
"""


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file (the MNIST format)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def pattern_images(labels: np.ndarray, size: int, channels: int, seed: int) -> np.ndarray:
    """Images a small network learns to tell apart in a few dozen steps: class k is a stripe
    texture (period 2 + k % 5 pixels, horizontal or vertical by (k // 5) % 2) at a random phase,
    over noise. [N, H, W] for one channel, else [N, H, W, C]."""
    rng = np.random.default_rng(seed)
    coord = np.arange(size)
    imgs = np.empty((len(labels), size, size), dtype=np.int64)
    for i, k in enumerate(labels):
        period = 2 + k % 5
        stripes = ((coord + rng.integers(period)) % period) < period / 2
        imgs[i] = np.where(stripes[None, :] if (k // 5) % 2 else stripes[:, None], 200, 40)
    imgs = imgs + rng.integers(0, 40, size=imgs.shape)
    imgs = np.clip(imgs, 0, 255).astype(np.uint8)
    return imgs if channels == 1 else np.repeat(imgs[..., None], channels, axis=-1)


def write_fmnist(root: Path, n_train: int, n_test: int) -> Path:
    """The four Fashion-MNIST IDX files in ``root``: pattern images of 10 classes in turn."""
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        labels = np.arange(n) % 10
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", pattern_images(labels, 28, 1, seed))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return root


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    """Fashion-MNIST-format IDX files: 640 train / 200 test images, 10 learnable classes."""
    return write_fmnist(tmp_path_factory.mktemp("fmnist"), 640, 200)


@pytest.fixture(scope="session")
def cifar100_dir(tmp_path_factory) -> Path:
    """A cifar-100-python folder with 200 train / 100 test images in the distributed pickle format."""
    root = tmp_path_factory.mktemp("cifar") / "cifar-100-python"
    root.mkdir()
    for split, n, seed in (("train", 200, 0), ("test", 100, 1)):
        labels = np.arange(n) % 100
        hwc = pattern_images(labels, 32, 3, seed)
        rows = hwc.transpose(0, 3, 1, 2).reshape(n, 3072)  # R plane, G plane, B plane
        with open(root / split, "wb") as f:
            batch = {b"data": rows, b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist()}
            pickle.dump(batch, f, protocol=2)
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, f, protocol=2)
    return root


@pytest.fixture(scope="session")
def imagefolder_dir(tmp_path_factory) -> Path:
    """train/ and val/ ImageFolder trees of 4 classes, JPEG and PNG, 80x60 images."""
    root = tmp_path_factory.mktemp("imagefolder")
    for split, n, seed in (("train", 8, 0), ("val", 3, 1)):
        labels = np.repeat(np.arange(4), n)
        imgs = pattern_images(labels, 80, 3, seed)[:, :60]
        for i, (img, k) in enumerate(zip(imgs, labels, strict=True)):
            d = root / split / f"class_{k}"
            d.mkdir(parents=True, exist_ok=True)
            ext = "JPEG" if i % 2 else "png"
            Image.fromarray(img).save(d / f"img_{i}.{ext}", format="JPEG" if ext == "JPEG" else "PNG")
    return root


def write_jpeg_tree(root: Path, n_train: int = 48, n_val: int = 14, size: int = 20) -> Path:
    """An ImageFolder of real JPEGs, 4 classes: train/ (classes in turn) and val/ (n_val images,
    so the classes need not divide it). Every image is distinct (pattern plus noise)."""
    for split, n, seed in (("train", n_train, 2), ("val", n_val, 3)):
        labels = np.arange(n) % 4
        for i, (img, k) in enumerate(zip(pattern_images(labels, size, 3, seed), labels, strict=True)):
            d = root / split / f"c{k}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def jpeg_tree(tmp_path_factory) -> Path:
    """train/ (48) and val/ (14) JPEGs of 4 classes, 20x20 px."""
    return write_jpeg_tree(tmp_path_factory.mktemp("jpegs"))


@pytest.fixture(scope="session")
def wds_dir(jpeg_tree, tmp_path_factory) -> Path:
    """jpeg_tree packed by `visionzoo data pack` into tar shards of 5 images (10 train, 3 val)."""
    from visionzoo.cli import main

    out = tmp_path_factory.mktemp("wds") / "shards"
    assert main(["data", "pack", str(jpeg_tree), str(out), "--shard-samples", "5"]) == 0
    return out


@pytest.fixture(scope="session")
def hf_dir(jpeg_tree, tmp_path_factory) -> Path:
    """jpeg_tree packed into the Hub's parquet layout, 16 images per file."""
    from visionzoo.cli import main

    out = tmp_path_factory.mktemp("hf") / "parquet"
    assert main(["data", "pack", str(jpeg_tree), str(out), "--format", "hfds", "--shard-samples", "16"]) == 0
    return out


def start_ranks(argv_of, world: int = 2, **popen) -> list:
    """``world`` processes ``argv_of(rank)`` started as the ranks of one process group on 127.0.0.1
    (RANK, WORLD_SIZE, MASTER_ADDR/PORT set; this tree's src first on PYTHONPATH; one thread each),
    for tests that check what several ranks do together."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).resolve().parents[1] / "src")
    return [subprocess.Popen(argv_of(rank), text=True, **popen,
                             env={**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", "RANK": str(rank),
                                  "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
            for rank in range(world)]


class StopAfter:
    """engine/run.py's StopSignal as if SIGTERM arrived before optimizer step ``n`` + 1: the ranks'
    vote after step ``n`` stops the run (monkeypatch ``visionzoo.engine.run.StopSignal`` with it)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls, self.signum = n, 0, 15

    def __call__(self) -> StopAfter:  # used where the class StopSignal is called
        return self

    def __enter__(self) -> StopAfter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @property
    def code(self) -> int:
        self.calls += 1
        return 1 if self.calls >= self.n else 0


@pytest.fixture(autouse=True)
def unprobed_load(monkeypatch):
    """In-process runs choose their CPU threads as where the machine's load cannot be read (the
    cores less the loader workers): a parallel test process must not change a run's thread
    count, and so its round-off. tests/test_cpu_threads.py sets the load it tests."""
    from visionzoo.engine import run

    monkeypatch.setattr(run, "busy_elsewhere", lambda: None)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: OpenMP threads only add spin-wait
    overhead there (30x on a busy 2-core machine); the count is put back afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
