"""From a DataConfig to datasets and loaders: which reader (the data source table,
data/sources/table.py), which split, which transforms, which loader."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from visionzoo import distributed
from visionzoo.data.augment import registry
from visionzoo.data.augment.presets import eval_transform, train_transform
from visionzoo.data.loading.collate import collate_multicrop, collate_skip_bad
from visionzoo.data.loading.device_batches import DeviceBatches, find_normalize
from visionzoo.data.loading.device_decode import DeviceDecodeLoader
from visionzoo.data.loading.in_memory import InMemoryLoader, InMemoryMultiCropLoader
from visionzoo.data.loading.samplers import SampleOrder, SeededDataset, ShardSampler
from visionzoo.data.loading.stream_loader import StreamLoader
from visionzoo.data.sources.shards import ShardStream
from visionzoo.data.sources.splits import Splits
from visionzoo.data.sources.table import data_source, names
from visionzoo.data.sources.tensor_dataset import TensorImageDataset
from visionzoo.errors import UserError

if TYPE_CHECKING:
    from visionzoo.config import DataConfig, DinoConfig

# What build_loader(s) and multicrop_train_loader return: each yields (images, targets, n_bad)
# batches on the device and has set_epoch(epoch, skip_batches).
Loader = DeviceBatches | InMemoryLoader | InMemoryMultiCropLoader | DeviceDecodeLoader


def with_packed_format(d: DataConfig) -> DataConfig:
    """``d`` with data.name set to the format of a folder written by ``visionzoo data pack`` (its
    manifest.json names it) when data.name is another encoded format, and to the remote packed
    format (webdataset) for a URL given as an unpacked one (ImageFolder): eval, knn, linear and
    infer --data then read whatever --data holds. Sources are as data/sources/table.py says."""
    source = data_source(d.name)
    if not source.encoded or not d.path:
        return d
    if "://" in d.path:
        remote = names(packed=True, remote=True)
        return replace(d, name=remote[0]) if not source.packed and remote else d
    root = Path(d.path).expanduser()
    if (root / "manifest.json").is_file() and not (root / "train").is_dir():
        import json

        try:
            fmt = json.loads((root / "manifest.json").read_text()).get("format")
        except ValueError:
            return d
        if fmt in names(packed=True):
            return replace(d, name=fmt)
    return d


def check_data_path(d: DataConfig) -> None:
    """Fail early (before workers are launched) on an unknown data.name or a data path that does
    not exist."""
    d = with_packed_format(d)
    data_source(d.name).check_path(d)


def build_datasets(d: DataConfig, train: bool = True) -> Splits:
    """The train (when ``train``) and validation datasets a DataConfig describes, read by its data
    source (data/sources/table.py) and given the recipe's transforms (a generated source's
    images get none: the device-resident loader only normalises them)."""
    d = with_packed_format(d)
    source = data_source(d.name)
    splits = source.read(d, train)
    if not source.generated:
        if splits.train is not None:
            splits.train.transform = train_transform(d)
        splits.val.transform = eval_transform(d)
    return splits


FIRST = SampleOrder()  # one process, seed 0: evaluation and single-process loaders


def build_loader(
    ds: Dataset, batch_size: int, workers: int, train: bool, order: SampleOrder = FIRST,
    device: torch.device | None = None, memory_format: torch.memory_format = torch.contiguous_format,
    collate_fn: Callable = collate_skip_bad,
) -> DeviceBatches:
    """A loader yielding ``(images, targets, n_bad)`` on ``device`` (default: the CPU), images
    as normalised float32 in ``memory_format``; ``batch_size`` is per device; ``order``: which
    samples this rank reads (seed, rank, world size, the reference's rank groups). ``collate_fn``
    stacks the items (DINO: its crops, data/augment/multicrop.py). On CUDA the batches come
    through pinned memory.

    Workers decode and augment each image and hand over uint8; the batch is normalised on the
    device (data/loading/device_batches.py). Training shuffles per epoch (``loader.set_epoch``) and
    drops the last partial batch; evaluation gives each rank a contiguous shard (see
    data/loading/samplers.py). Shard streams (webdataset, hfds) are read by a StreamLoader with the same
    interface (data/sources/shards.py)."""
    normalize, device = find_normalize(ds), device or torch.device("cpu")
    pin_memory, seed = device.type == "cuda", order.seed
    if isinstance(ds, ShardStream):
        return DeviceBatches(StreamLoader(ds, batch_size, workers, train, order, collate_fn, pin_memory),
                             device, normalize, memory_format)
    # rank_groups: the training order of samplers.train_indices
    sampler = ShardSampler(len(ds), train, seed, order.rank, order.world_size, order.rank_groups)
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


def multicrop_loader(ds: Dataset, batch_size: int, workers: int, order: SampleOrder = FIRST,
                     device: torch.device | None = None) -> DeviceBatches:
    """A loader of ``(crops, targets, n_bad)`` batches on ``device`` (default: the CPU), crops
    normalised there, ``batch_size`` images per device, with the shared shard rule and
    per-sample seeded augmentation of loading/samplers.py (call ``loader.set_epoch`` every epoch);
    the last partial batch is dropped."""
    return build_loader(ds, batch_size, workers, True, order, device, collate_fn=collate_multicrop)


def training_path(d: DataConfig, ds: Dataset) -> str:
    """The path of data/augment/registry.py that augments the training split ``ds``: device decode
    with data.decode=device; in memory for a split held in memory with data.device_resident (and
    synthetic data); per image otherwise."""
    if d.decode == "device":
        return registry.DEVICE_DECODE
    if data_source(d.name).generated or (d.device_resident and isinstance(ds, TensorImageDataset)):
        return registry.IN_MEMORY
    return registry.PER_IMAGE


def multicrop_train_loader(ds: Dataset, d: DataConfig, dino: DinoConfig, batch_size: int, device: torch.device,
                           seed: int, rank: int = 0, world_size: int = 1) -> Loader:
    """DINO's training loader: batches ``(crops, labels, n_bad)`` of ``ds`` (labels carried, never
    used), the views made on ``training_path(d, ds)`` by the table's multi-crop implementation
    there; call ``set_epoch(epoch, skip_batches)`` every epoch."""
    path = training_path(d, ds)
    if path == registry.IN_MEMORY:
        return InMemoryMultiCropLoader(ds, batch_size, device, d, dino, seed, rank, world_size)
    views = registry.multicrop(d, dino, path)
    if path == registry.DEVICE_DECODE:
        return DeviceDecodeLoader(ds, batch_size, d.workers, device, d, SampleOrder(seed, rank, world_size),
                                  augment=views)
    if not hasattr(ds, "transform"):
        raise UserError(f"data.name={d.name} gives no per-image transform to apply multi-crop to")
    ds.transform = views
    return multicrop_loader(ds, batch_size, d.workers, SampleOrder(seed, rank, world_size), device)


def build_loaders(
    splits: Splits, d: DataConfig, batch_size: int, device: torch.device, order: SampleOrder = FIRST,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[Loader | None, Loader]:
    """Train and val loaders for ``splits`` (train is None when ``splits.train`` is), both
    yielding ``(images, targets, n_bad)`` with ``batch_size`` images per device.

    In-memory splits use the device-resident loader when ``d.device_resident`` (it augments with
    the in-memory column of data/augment/registry.py; validation batches only when the eval
    preprocessing keeps the stored size, data.test_resize 0); synthetic data always does,
    unaugmented, so that a --perf run on it measures the model; everything else goes through
    DataLoader. With ``d.decode == "device"`` ImageFolder training batches are decoded on
    ``device`` (data/loading/device_decode.py). ``order.rank_groups``: the training order of
    samplers.train_indices."""
    synthetic = data_source(d.name).generated
    in_memory = synthetic or (d.device_resident and isinstance(splits.val, TensorImageDataset))

    def make(ds: Dataset, train: bool) -> Loader:
        if in_memory and (train or synthetic or d.test_resize <= 0):
            return InMemoryLoader(ds, batch_size, train, device, d, order, memory_format, augment=not synthetic)
        return build_loader(ds, batch_size, d.workers, train, order, device, memory_format)
    if splits.train is not None and d.decode == "device":  # training only; validation stays on the CPU path
        train = DeviceDecodeLoader(splits.train, batch_size, d.workers, device, d, order, memory_format)
    else:
        train = make(splits.train, True) if splits.train is not None else None
    return train, make(splits.val, False)


def set_loader_epoch(loader: Loader | DataLoader, epoch: int, skip_batches: int) -> None:
    """Select an epoch's sample order in any kind of loader, skipping the batches already trained on."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch, skip_batches)
    else:
        loader.sampler.set_epoch(epoch, skip_batches * loader.batch_size)


def loader_workers(loader: Any) -> int:
    """The worker processes a training loader keeps busy (0: batches made in this process)."""
    inner = loader.loader if isinstance(loader, DeviceBatches) else loader
    return int(getattr(inner, "num_workers", 0) or 0)


def loader_kind(loader: Loader) -> str:
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


def cpu_fallbacks(loader: Loader, device: torch.device) -> int | None:
    """Images a device-decode loader handed to Pillow instead of the device decoder, summed over
    ranks (a collective when distributed); None for loaders that decode on the CPU anyway."""
    n = getattr(loader, "cpu_fallbacks", None)
    if n is None and not distributed.from_env().enabled:
        return None
    # Every rank takes part, even one whose loader has no count, so the collective never hangs.
    total = distributed.all_reduce_sum(torch.tensor([n or 0, n is not None], dtype=torch.float64, device=device))
    return int(total[0]) if total[1] > 0 else None
