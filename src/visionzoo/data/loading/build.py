"""From a DataConfig to datasets and loaders: which reader, which split, which transforms."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from visionzoo import distributed
from visionzoo.data.augment.presets import eval_transform, train_transform
from visionzoo.data.loading.collate import collate_multicrop, collate_skip_bad
from visionzoo.data.loading.device_batches import DeviceBatches, find_normalize
from visionzoo.data.loading.device_decode import DeviceDecodeLoader
from visionzoo.data.loading.in_memory import InMemoryLoader
from visionzoo.data.loading.samplers import SeededDataset, ShardSampler
from visionzoo.data.loading.stream_loader import StreamLoader
from visionzoo.data.sources.cifar import load_cifar
from visionzoo.data.sources.class_folders import class_dir_of, find_classes, val_dir_of
from visionzoo.data.sources.folder import ImageFolderDataset
from visionzoo.data.sources.idx import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_CLASSES, MNIST_CLASSES, load_idx_split
from visionzoo.data.sources.shards import ShardStream
from visionzoo.data.sources.tensor_dataset import TensorImageDataset
from visionzoo.errors import UserError


@dataclass
class Splits:
    """The datasets of a run; ``classes`` comes from the data, not from the recipe."""

    train: Dataset | None
    val: Dataset
    classes: list[str]


def _existing_dir(path: str | None, what: str) -> Path:
    if not path:
        raise UserError(f"{what} needs a data folder: pass --data PATH")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data path does not exist: {p}")
    if not p.is_dir():
        raise UserError(f"data path is not a folder: {p}")
    return p


def _imagefolder(d, train: bool) -> Splits:
    root = _existing_dir(d.path, "an ImageFolder data set")
    val_dir = val_dir_of(root)
    if val_dir is None:
        raise UserError(f"{root} has no val/ folder (expected {root}/train/<class>/... and {root}/val/<class>/...)")
    train_dir = root / "train"
    if train and not train_dir.is_dir():
        raise UserError(f"{root} has no train/ folder (expected {root}/train/<class>/...)")
    # Labels are the training split's class folders, so val indices always mean the same class.
    classes = find_classes(class_dir_of(root))
    train_ds = ImageFolderDataset(train_dir, classes, train_transform(d), d.scan_cache) if train else None
    val_ds = ImageFolderDataset(val_dir, classes, eval_transform(d), d.scan_cache)
    return Splits(train_ds, val_ds, classes)


def _in_memory(d, train: bool) -> Splits:
    if d.name in ("cifar10", "cifar100"):
        nc = 10 if d.name == "cifar10" else 100
        if d.path is None:
            raise UserError(f"{d.name} needs --data: the folder holding cifar-{nc}-python* (or its parent)")
        _existing_dir(d.path, d.name)
        load = lambda is_train: load_cifar(d.path, is_train, nc)  # noqa: E731
    else:
        path = d.path or (DEFAULT_FASHION_MNIST_DIR if d.name == "fashion_mnist" else None)
        if path is None:
            raise UserError("mnist needs --data: the folder holding the IDX files")
        _existing_dir(path, d.name)
        names = FASHION_MNIST_CLASSES if d.name == "fashion_mnist" else MNIST_CLASSES

        def load(is_train: bool):
            images, labels = load_idx_split(path, is_train)
            return images, labels, list(names)

    val_images, val_labels, classes = load(False)
    val_ds = TensorImageDataset(val_images, val_labels, classes, eval_transform(d))
    train_ds = None
    if train:
        images, labels, _ = load(True)
        train_ds = TensorImageDataset(images, labels, classes, train_transform(d))
    return Splits(train_ds, val_ds, classes)


def _synthetic(d, train: bool) -> Splits:
    """Random uint8 images at the recipe's crop sizes, with random labels: a throughput source
    that costs no decoding (the device-resident loader only normalises them)."""
    g = np.random.default_rng(0)
    classes = [str(i) for i in range(d.num_classes)]

    def split(n: int, size: int) -> TensorImageDataset:
        images = g.integers(0, 256, (n, size, size, d.in_chans), dtype=np.uint8)
        return TensorImageDataset(images, g.integers(0, d.num_classes, n), classes)

    train_ds = split(d.synthetic_samples, d.image_size) if train else None
    return Splits(train_ds, split(max(d.synthetic_samples // 4, 1), d.test_size), classes)


def with_packed_format(d):
    """``d`` with data.name set to the format of a folder written by ``visionzoo data pack`` (its
    manifest.json names it) when data.name is another file format, and to webdataset for a URL
    given as an ImageFolder: eval, knn, linear and infer --data then read whatever --data holds."""
    if d.name not in ("imagefolder", "webdataset", "hfds") or not d.path:
        return d
    if "://" in d.path:
        return replace(d, name="webdataset") if d.name == "imagefolder" else d
    root = Path(d.path).expanduser()
    if (root / "manifest.json").is_file() and not (root / "train").is_dir():
        import json

        try:
            fmt = json.loads((root / "manifest.json").read_text()).get("format")
        except ValueError:
            return d
        if fmt in ("webdataset", "hfds"):
            return replace(d, name=fmt)
    return d


def _streamed(d, train: bool) -> Splits:
    """Tar shards (sources/webdataset.py) or a Hugging Face data set (sources/hfds.py), streamed."""
    if d.name == "webdataset":
        from visionzoo.data.sources.webdataset import webdataset_splits as splits
    else:
        from visionzoo.data.sources.hfds import hfds_splits as splits
    train_ds, val_ds, classes = splits(d, train)
    if train_ds is not None:
        train_ds.transform = train_transform(d)
    val_ds.transform = eval_transform(d)
    return Splits(train_ds, val_ds, classes)


def check_data_path(d) -> None:
    """Fail early (before workers are launched) on a data path that does not exist."""
    d = with_packed_format(d)
    if d.name == "webdataset":
        from visionzoo.data.sources.webdataset import check_path

        check_path(d)
    elif d.name != "synthetic" and d.path and not (d.name == "hfds" and (d.train or d.val)):
        _existing_dir(d.path, d.name)


def build_datasets(d, train: bool = True) -> Splits:
    """The train (when ``train``) and validation datasets a DataConfig describes."""
    d = with_packed_format(d)
    if d.name == "synthetic":
        return _synthetic(d, train)
    if d.name == "imagefolder":
        return _imagefolder(d, train)
    if d.name in ("webdataset", "hfds"):
        return _streamed(d, train)
    return _in_memory(d, train)


def build_loader(
    ds: Dataset, batch_size: int, workers: int, train: bool, seed: int,
    rank: int = 0, world_size: int = 1, pin_memory: bool = False, device: torch.device | None = None,
    memory_format: torch.memory_format = torch.contiguous_format, collate_fn: Callable = collate_skip_bad,
    rank_groups: tuple[int, int] = (1, 0),
) -> DeviceBatches:
    """A loader yielding ``(images, targets, n_bad)`` on ``device`` (default: the CPU), images
    as normalised float32 in ``memory_format``; ``batch_size`` is per device. ``collate_fn``
    stacks the items (DINO: its crops, data/augment/multicrop.py).

    Workers decode and augment each image and hand over uint8; the batch is normalised on the
    device (data/loading/device_batches.py). Training shuffles per epoch (``loader.set_epoch``) and
    drops the last partial batch; evaluation gives each rank a contiguous shard (see
    data/loading/samplers.py). Shard streams (webdataset, hfds) are read by a StreamLoader with the same
    interface (data/sources/shards.py)."""
    normalize, device = find_normalize(ds), device or torch.device("cpu")
    if isinstance(ds, ShardStream):
        return DeviceBatches(StreamLoader(ds, batch_size, workers, train, seed, rank, world_size, collate_fn, pin_memory),
                             device, normalize, memory_format)
    sampler = ShardSampler(len(ds), train, seed, rank, world_size, rank_groups)  # rank_groups: samplers.train_indices
    if train:
        ds = SeededDataset(ds, seed)
    workers = max(0, min(workers, os.cpu_count() or 1))
    loader = DataLoader(
        ds, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed),  # leaves the global RNG alone
        pin_memory=pin_memory, drop_last=train, persistent_workers=workers > 0 and train,
        prefetch_factor=4 if workers > 0 else None,
    )
    return DeviceBatches(loader, device, normalize, memory_format)


def multicrop_loader(ds: Dataset, batch_size: int, workers: int, seed: int, rank: int = 0,
                     world_size: int = 1, pin_memory: bool = False,
                     device: torch.device | None = None) -> DeviceBatches:
    """A loader of ``(crops, targets, n_bad)`` batches on ``device`` (default: the CPU), crops
    normalised there, ``batch_size`` images per device, with the shared shard rule and
    per-sample seeded augmentation of loading/samplers.py (call ``loader.set_epoch`` every epoch);
    the last partial batch is dropped."""
    return build_loader(ds, batch_size, workers, True, seed, rank, world_size, pin_memory, device,
                        collate_fn=collate_multicrop)


def build_loaders(
    splits: Splits, d, batch_size: int, device: torch.device, seed: int, rank: int = 0,
    world_size: int = 1, memory_format: torch.memory_format = torch.contiguous_format,
    rank_groups: tuple[int, int] = (1, 0),
) -> tuple:
    """Train and val loaders for ``splits`` (train is None when ``splits.train`` is), both
    yielding ``(images, targets, n_bad)`` with ``batch_size`` images per device.

    In-memory splits use the device-resident loader when ``d.device_resident`` and the
    augmentation is one it implements (crop/flip, then RandAugment); synthetic data always does, unaugmented, so
    that a --perf run on it measures the model; everything else goes through DataLoader.
    With ``d.decode == "device"`` ImageFolder training batches are decoded on ``device``
    (data/loading/device_decode.py). ``rank_groups``: the training order of samplers.train_indices."""
    synthetic = d.name == "synthetic"
    resident = synthetic or (d.device_resident and isinstance(splits.val, TensorImageDataset)
                             and d.augment in ("cifar", "none"))
    if resident:
        def make(ds, train):
            return InMemoryLoader(ds, batch_size, train, device, d, seed, rank, world_size, memory_format,
                                  augment=not synthetic, rank_groups=rank_groups)
    else:
        def make(ds, train):
            return build_loader(ds, batch_size, d.workers, train, seed, rank, world_size,
                                pin_memory=device.type == "cuda", device=device, memory_format=memory_format,
                                rank_groups=rank_groups)
    if splits.train is not None and d.decode == "device":  # training only; validation stays on the CPU path
        train = DeviceDecodeLoader(splits.train, batch_size, d.workers, device, d, seed, rank, world_size,
                                   memory_format, rank_groups=rank_groups)
    else:
        train = make(splits.train, True) if splits.train is not None else None
    return train, make(splits.val, False)


def loader_kind(loader) -> str:
    """How a training loader produces batches, as results and bench name it."""
    if isinstance(loader, DeviceDecodeLoader):
        return f"device decode ({loader.num_workers} byte-reading workers per device)"
    if isinstance(loader, DeviceBatches):
        loader = loader.loader
    if isinstance(loader, DataLoader):
        return f"DataLoader ({loader.num_workers} workers per device)"
    if isinstance(loader, StreamLoader):
        return f"shard stream ({loader.num_workers} workers per device)"
    return "device-resident"


def failed_shards(*loaders) -> list[str]:
    """The shards that failed in any of ``loaders`` on any rank (a collective when distributed)."""
    import torch.distributed as dist

    names: list[str] = []
    for loader in loaders:
        inner = getattr(loader, "loader", None)  # DeviceDecodeLoader wraps a StreamLoader
        for src in (loader, inner):
            names += [n for n in getattr(src, "bad_shards", []) if n not in names]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, names)
        names = list(dict.fromkeys(n for part in everyone for n in part))
    return names


def cpu_fallbacks(loader, device: torch.device) -> int | None:
    """Images a device-decode loader handed to Pillow instead of the device decoder, summed over
    ranks (a collective when distributed); None for loaders that decode on the CPU anyway."""
    n = getattr(loader, "cpu_fallbacks", None)
    if n is None and not distributed.from_env().enabled:
        return None
    # Every rank takes part, even one whose loader has no count, so the collective never hangs.
    total = distributed.all_reduce_sum(torch.tensor([n or 0, n is not None], dtype=torch.float64, device=device))
    return int(total[0]) if total[1] > 0 else None
