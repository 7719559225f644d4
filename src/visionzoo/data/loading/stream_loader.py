"""Batches of a ShardStream (sources/shards.py) on any number of ranks and loader workers, one
pass over the shards per epoch.

Training. The epoch's shard order is a permutation seeded by (seed, epoch); concatenated, the
shards give the epoch's sample positions 0..T-1. Each rank gets N × batch consecutive positions
(N = T // (ranks × batch), as ``ShardSampler`` drops the same remainder) and splits them into
consecutive runs, one per loader worker. A run is cut at sample boundaries, so two workers share
at most the shard at the cut: one reads up to the cut, the next streams past the part before it.
Each worker shuffles its run through a buffer of ``data.shuffle_buffer`` samples (seeded by
seed, epoch, rank and worker), so every sample is seen once per epoch over all ranks and every
rank takes the same number of steps. With fewer shards than ranks × workers this still holds,
but several workers stream through the same shard (more reading, a weaker shuffle): a warning
says so.

Batch ``j`` of a rank comes from worker ``j % workers`` (DataLoader hands out worker batches in
turn), so skipping ``k`` batches to resume mid-epoch is exact: each worker re-reads its run and
drops the samples of its batches before ``k`` before decoding anything.

Evaluation: no shuffle; rank r gets its contiguous share of the positions (``eval_indices``),
split over its workers: every sample exactly once, none padded.

A shard that fails leaves placeholders for its unread positions (sources/shards.py), so every rank
still takes the same number of batches; the loader keeps the failed shards' names
(``bad_shards``) for results.json."""

from __future__ import annotations

import os
import random
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from visionzoo.data.loading.collate import collate_skip_bad
from visionzoo.data.loading.samplers import SampleOrder, SeededDataset, eval_indices, sample_seed
from visionzoo.data.sources.shards import SampleWarnings, Shard, ShardStream, decode_sample, warn


def _parts(shards: list[Shard], order: list[int], start: int, stop: int) -> list[tuple[int, int, int, int]]:
    """The pieces of shards (index, first, stop, first position) that cover positions
    ``[start, stop)`` of the shards concatenated in ``order``."""
    out, offset = [], 0
    for i in order:
        n = shards[i].samples
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append((i, lo - offset, hi - offset, lo))
        offset += n
        if offset >= stop:
            break
    return out


def train_plan(n: int, batch: int, seed: int, epoch: int, rank: int, world: int, workers: int) -> list[tuple[int, int]]:
    """Per virtual worker: (first position, samples) of its run in this rank's share of one
    training epoch; worker v holds the batches j with j % workers == v."""
    del seed, epoch  # the positions do not depend on them; the shard order does
    per_rank = n // (world * batch)
    start = rank * per_rank * batch
    runs = []
    for v in range(workers):
        size = len(range(v, per_rank, workers)) * batch
        runs.append((start, size))
        start += size
    return runs


def eval_plan(n: int, batch: int, rank: int, world: int, workers: int) -> list[tuple[int, int]]:
    """Per worker: (first position, samples) of its part of this rank's evaluation share, whole
    batches each but the last non-empty one."""
    share = eval_indices(n, rank, world)
    start, size = (int(share[0]), len(share)) if len(share) else (0, 0)
    n_batches = -(-size // batch)
    sizes = [len(range(v, n_batches, workers)) * batch for v in range(workers)]
    last = max((v for v in range(workers) if sizes[v]), default=None)
    if last is not None:
        sizes[last] -= n_batches * batch - size
    runs = []
    for s in sizes:
        runs.append((start, s))
        start += s
    return runs


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: each item leaves at a random later point, within ``size`` items."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


class _Pass(IterableDataset):
    """One rank's pass over a ShardStream, as DataLoader workers run it. ``state`` (shared
    memory: [epoch, batches to skip]) is read at the start of every pass, so persistent workers
    follow ``set_epoch``."""

    def __init__(self, stream: ShardStream, state: torch.Tensor, batch: int, workers: int, train: bool,
                 seed: int, rank: int, world: int):
        self.stream, self.state, self.batch, self.workers = stream, state, batch, workers
        self.train, self.seed, self.rank, self.world = train, seed, rank, world
        self.pending: dict[int, tuple[bytes, int]] = {}

    def order(self, epoch: int) -> list[int]:
        """The epoch's shard order (training: shuffled per epoch; evaluation: as given)."""
        n = len(self.stream.shards)
        if not self.train:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def runs(self, epoch: int) -> list[tuple[int, int]]:
        n = len(self.stream)
        if self.train:
            return train_plan(n, self.batch, self.seed, epoch, self.rank, self.world, self.workers)
        return eval_plan(n, self.batch, self.rank, self.world, self.workers)

    def __iter__(self) -> Iterator[tuple[Any, str | None]]:
        info = get_worker_info()
        epoch, skip = (int(x) for x in self.state.tolist())
        w = info.id if info is not None else 0
        # Worker w plays virtual worker v: after skipping `skip` batches, DataLoader asks
        # worker 0 first, so it must hold batch `skip`.
        v = (w + skip) % self.workers if self.train else w
        start, size = self.runs(epoch)[v]
        parts = _parts(self.stream.shards, self.order(epoch), start, start + size)
        items: Iterator = self.stream.slots(parts)
        drop = 0
        if self.train:
            rng = random.Random(sample_seed(self.seed, epoch, self.rank * self.workers + v))
            items = _shuffled(items, max(self.stream.shuffle_buffer, 1), rng)
            drop = len(range(v, skip, self.workers)) * self.batch
        seeded = SeededDataset(self, self.seed)  # per-sample augmentation seeds, as for ImageFolder
        kept, warnings = (item for k, item in enumerate(items) if k >= drop), SampleWarnings()
        for pos, key, data, label, problem, failed_shard in self.stream.checked(kept, warnings):
            if problem is not None:
                yield None, failed_shard
                continue
            item = self._decode(seeded, pos, epoch, data, label)
            if item is None:  # undecodable bytes: named like a bad label
                warnings.say(key, "the image cannot be decoded")
            yield item, None

    def _decode(self, seeded: SeededDataset, pos: int, epoch: int, data: bytes, label: int) -> Any:
        if self.stream.mode == "bytes" or not self.train:
            return self.stream.decode(data, label)
        self.pending[pos] = (data, label)
        return seeded[(pos, epoch)]

    def __getitem__(self, pos: int) -> Any:  # what SeededDataset calls, under the sample's seeds
        data, label = self.pending.pop(pos)
        return decode_sample(data, label, self.stream.transform)



class _Collate:
    """The loader's collate function on the items, plus the names of shards that failed."""

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, batch: list) -> tuple[Any, list[str]]:
        return self.collate([item for item, _ in batch]), list(dict.fromkeys(s for _, s in batch if s is not None))


class _EpochSetter:
    """``loader.sampler.set_epoch(epoch, skip_samples)`` for code written against ShardSampler."""

    def __init__(self, loader: StreamLoader):
        # A weak reference: no cycle, so a dropped loader stops its workers at once instead of in
        # a later garbage collection, which may run in a forked worker of another loader.
        self.loader = weakref.ref(loader)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        loader = self.loader()
        loader.set_epoch(epoch, skip // loader.batch_size)


class StreamLoader:
    """Batches of a ShardStream, ``batch_size`` per rank, collated by ``collate`` (training: full
    batches only, the same number on every rank). Call ``set_epoch(epoch, skip_batches)`` before
    each epoch; ``bad_shards`` lists the shards that failed so far."""

    def __init__(self, stream: ShardStream, batch_size: int, workers: int, train: bool,
                 order: SampleOrder | None = None, collate: Callable | None = None, pin_memory: bool = False):
        # A stream deals its shards by train_plan / eval_plan: order.rank_groups does not apply.
        order = order or SampleOrder()
        seed, rank, world_size = order.seed, order.rank, order.world_size
        self.stream, self.batch_size, self.train = stream, batch_size, train
        self.num_workers = max(0, min(workers, os.cpu_count() or 1))
        n_virtual = max(self.num_workers, 1)
        self.state = torch.zeros(2, dtype=torch.int64).share_memory_()
        self.dataset = _Pass(stream, self.state, batch_size, n_virtual, train, seed, rank, world_size)
        self.sampler = _EpochSetter(self)
        self.bad_shards: list[str] = []
        self.loader = DataLoader(
            self.dataset, batch_size=batch_size, num_workers=self.num_workers,
            collate_fn=_Collate(collate or collate_skip_bad), pin_memory=pin_memory, drop_last=train,
            generator=torch.Generator().manual_seed(seed),  # leaves the global RNG alone
            persistent_workers=self.num_workers > 0 and train, prefetch_factor=4 if self.num_workers > 0 else None,
        )
        consumers = world_size * n_virtual
        if train and rank == 0 and len(stream.shards) < consumers:
            warn(f"{len(stream.shards)} shard(s) for {world_size} rank(s) × {n_virtual} loader worker(s): workers "
                 f"share shards (each streams past the part before its own); every sample is still read once per "
                 f"epoch, but reading costs more and the shuffle is weaker: write smaller shards "
                 f"(visionzoo data pack --shard-size) or use fewer workers")

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order; ``skip_batches`` resumes after that many batches."""
        self.state[0], self.state[1] = epoch, skip_batches if self.train else 0

    def __len__(self) -> int:
        epoch, skip = (int(x) for x in self.state.tolist())
        runs = self.dataset.runs(epoch)
        if self.train:
            return max(sum(size // self.batch_size for _, size in runs) - skip, 0)
        return sum(-(-size // self.batch_size) for _, size in runs)

    def __iter__(self):
        for batch, bad in self.loader:
            for name in bad:
                if name not in self.bad_shards:
                    self.bad_shards.append(name)
            yield batch
