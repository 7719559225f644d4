"""How samples are split over devices, shared by the DataLoader path and the device-resident
loader so both see the same order.

Training (any world size, one process included): a permutation seeded by (seed, epoch) —
torch.randperm as DistributedSampler draws it — cut to a multiple of the world size; rank r
takes every world-th index from r. Optimizer step i on N devices then sees exactly the global
batch that step i sees on one device, which makes 1- and N-device runs comparable.

Evaluation: contiguous shards with no padding, so no sample is counted twice.

Random augmentation is seeded per sample from (seed, epoch, index) — ``SeededDataset`` for
per-image transforms, ``sample_seed`` per batch in the device-resident loader — so the images
of a step do not depend on the number of loader workers, and a run resumed in the middle of an
epoch draws exactly what the uninterrupted run drew."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info


@dataclass(frozen=True)
class SampleOrder:
    """Which samples one rank reads and in which order, as every loader deals them: ``seed`` (the
    epoch permutations and the per-sample augmentation seeds, ``sample_seed``), ``rank`` of
    ``world_size``, and ``rank_groups`` (the training order of ``train_indices``)."""

    seed: int = 0
    rank: int = 0
    world_size: int = 1
    rank_groups: tuple[int, int] = (1, 0)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for one sample (or batch) of one epoch, distinct for every triple in practice."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % (2**63 - 1)


def seed_sample_rngs(s: int) -> None:
    """Seed the CPU random streams per-image transforms draw from (torch's default CPU
    generator, Python's ``random``, NumPy's global RNG) for one sample. Cheaper than
    ``torch.manual_seed``, which also seeds every accelerator (~0.2 ms a call): the
    transforms run on the CPU."""
    torch.default_generator.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def train_indices(n: int, seed: int, epoch: int, rank: int, world_size: int,
                  rank_groups: tuple[int, int] = (1, 0)) -> torch.Tensor:
    """This rank's sample order for one training epoch: every world_size-th sample of a seeded
    permutation, as PyTorch's DistributedSampler deals them. ``rank_groups`` (k, size) with k > 1:
    this rank stands for k ranks of a run on world_size x k devices whose batches hold ``size``
    images (fewer devices than a recipe's reference, models/ghost_bn.py); each of its batches of
    k x size lists those ranks' batches one after the other, so a BatchNorm group or a
    micro-batch holds the images that reference rank holds."""
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g)
    k, size = rank_groups
    if k <= 1 or size <= 0:
        usable = (n // world_size) * world_size
        return perm[:usable][rank::world_size]
    ranks = world_size * k
    rows = (n // ranks) // size * size  # whole batches of every stood-for rank
    per_rank = perm[:rows * ranks].view(rows, ranks)  # [position in a rank's order, rank]
    mine = per_rank[:, rank * k:(rank + 1) * k]  # this rank's k ranks
    return mine.reshape(-1, size, k).transpose(1, 2).reshape(-1)  # batch by batch, rank after rank


def train_count(n: int, world_size: int, rank_groups: tuple[int, int] = (1, 0)) -> int:
    """How many samples ``train_indices`` gives each rank."""
    k, size = rank_groups
    return n // world_size if k <= 1 or size <= 0 else (n // (world_size * k)) // size * size * k


def eval_indices(n: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous shard of an evaluation split (the first n % world ranks get one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return torch.arange(start, start + base + (rank < extra))


class ShardSampler(Sampler):
    """Training: ``(index, epoch)`` pairs of ``train_indices`` (call set_epoch every epoch;
    ``skip`` leaves out the first samples, to resume mid-epoch). Evaluation: ``eval_indices``."""

    def __init__(self, n: int, train: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 rank_groups: tuple[int, int] = (1, 0)):
        self.n, self.train, self.seed, self.rank, self.world_size = n, train, seed, rank, world_size
        self.rank_groups = tuple(rank_groups)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator:
        if not self.train:
            return iter(eval_indices(self.n, self.rank, self.world_size).tolist())
        order = train_indices(self.n, self.seed, self.epoch, self.rank, self.world_size, self.rank_groups)[self.skip:]
        return iter((i, self.epoch) for i in order.tolist())

    def __len__(self) -> int:
        if not self.train:
            return len(eval_indices(self.n, self.rank, self.world_size))
        return max(train_count(self.n, self.world_size, self.rank_groups) - self.skip, 0)


class SeededDataset(Dataset):
    """Wraps a training dataset so item ``(index, epoch)`` is transformed under RNGs seeded by
    ``sample_seed``: torch's CPU generator, Python's ``random`` and NumPy's legacy global RNG
    (timm's RandAugment picks its ops with ``np.random``). In a loader worker nothing else
    draws from those streams, so they are simply reseeded; in the main process (workers=0) the
    caller's states are put back afterwards."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, epoch = item
        s = sample_seed(self.seed, epoch, index)
        if get_worker_info() is not None:
            seed_sample_rngs(s)
            return self.dataset[index]
        states = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:
            seed_sample_rngs(s)
            return self.dataset[index]
        finally:
            torch.set_rng_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])

    def __getitems__(self, items: list[tuple[int, int]]) -> list:
        """A batch; when the wrapped set names its samples, the names of its undecodable images
        ride along (for collate_skip_bad)."""
        batch = [self[item] for item in items]
        name_of = getattr(self.dataset, "sample_name", None)
        if name_of is None:
            return batch
        from visionzoo.data.sources.folder import with_bad_names

        return with_bad_names(batch, [name_of(index) for index, _ in items])

    def __getattr__(self, name: str) -> Any:  # classes, targets, samples ... of the wrapped set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
