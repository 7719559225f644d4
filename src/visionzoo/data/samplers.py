"""How samples are split over devices, shared by the DataLoader path and the device-resident
loader so both see the same order.

Training (any world size, one process included): a permutation seeded by (seed, epoch) —
torch.randperm as DistributedSampler draws it — cut to a multiple of the world size; rank r
takes every world-th index from r. Optimizer step i on N devices then sees exactly the global
batch that step i sees on one device, which makes 1- and N-device runs comparable.

Evaluation: contiguous shards with no padding, so no sample is counted twice."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


def train_indices(n: int, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's sample order for one training epoch."""
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g)
    usable = (n // world_size) * world_size
    return perm[:usable][rank::world_size]


def eval_indices(n: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous shard of an evaluation split (the first n % world ranks get one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return torch.arange(start, start + base + (rank < extra))


class ShardSampler(Sampler[int]):
    """A Sampler over ``train_indices`` (call set_epoch every epoch) or ``eval_indices``."""

    def __init__(self, n: int, train: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.train, self.seed, self.rank, self.world_size, self.epoch = n, train, seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        if self.train:
            return train_indices(self.n, self.seed, self.epoch, self.rank, self.world_size)
        return eval_indices(self.n, self.rank, self.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        return len(self._indices()) if not self.train else self.n // self.world_size
