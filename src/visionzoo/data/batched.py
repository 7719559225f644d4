"""A loader for data sets that fit in memory (CIFAR, MNIST): the whole uint8 split lives on the
training device, and each batch is cropped, flipped, RandAugmented (when the recipe has it) and
normalised there with tensor ops.

No worker processes and no per-image Python: on a GPU the split is uploaded once; on a CPU
it is still ~3x faster than per-image transforms. The augmentation is the same as the
per-image path (``transforms.train_transform`` with augment=cifar): zero padding by
``crop_padding``, a uniformly placed crop, a horizontal flip with probability ``hflip``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from visionzoo.data.batched_randaugment import BatchedRandAugment
from visionzoo.data.samplers import eval_indices, sample_seed, train_count, train_indices
from visionzoo.data.transfer import send, to_device
from visionzoo.data.transforms import Normalize


def random_crop_flip(
    x: torch.Tensor, size: int, padding: int, hflip: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample random crop of ``size`` after zero padding, and random horizontal flip, of a
    [B, C, H, W] batch (any dtype). Offsets are uniform over every valid position."""
    b, _, h, w = x.shape
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))
    ph, pw = h + 2 * padding, w + 2 * padding
    dev = x.device
    # Random numbers come from a CPU generator, so a run draws the same crops on any device; they
    # travel to the device in one asynchronous copy (data/transfer.py).
    oy = torch.randint(0, ph - size + 1, (b,), generator=generator)
    ox = torch.randint(0, pw - size + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < hflip if hflip > 0 else torch.zeros(b, dtype=torch.bool)
    oy, ox, flip = send([oy, ox, flip], dev, torch.int64)
    ar = torch.arange(size, device=dev)
    rows = (oy[:, None] + ar)[:, :, None]  # [B, S, 1]
    cols = (ox[:, None] + ar)[:, None, :]  # [B, 1, S]
    if hflip > 0:
        # A flipped crop reads its columns right to left.
        cols = torch.where(flip.bool()[:, None, None], cols.flip(-1), cols)
    batch_idx = torch.arange(b, device=dev)[:, None, None]
    out = x[batch_idx, :, rows, cols]  # [B, S, S, C]
    return out.permute(0, 3, 1, 2)


class InMemoryLoader:
    """Iterates ``(images, targets, 0)`` batches from a TensorImageDataset held on ``device``.

    Samples are split over ranks exactly as the DataLoader path splits them (data/samplers.py):
    call ``set_epoch`` every epoch; training drops the last partial batch; evaluation walks each
    rank's contiguous shard in order, no sample repeated."""

    def __init__(
        self, dataset, batch_size: int, train: bool, device: torch.device, d, seed: int = 0,
        rank: int = 0, world_size: int = 1, memory_format: torch.memory_format = torch.contiguous_format,
        augment: bool = True, rank_groups: tuple[int, int] = (1, 0),
    ):
        self.dataset = dataset
        self.images = dataset.images.to(device)
        self.labels = dataset.labels.to(device)
        self.batch_size, self.train, self.device = batch_size, train, device
        self.seed, self.rank, self.world_size, self.epoch, self.skip_batches = seed, rank, world_size, 0, 0
        self.augment = d.augment if augment else "off"
        self.size, self.padding, self.hflip = d.image_size, d.crop_padding, d.hflip
        self.normalize = Normalize.of(d)  # in the reference's order (data.normalize)
        self._stats = self.normalize.on(device)
        self.memory_format = memory_format
        self.rank_groups = rank_groups  # the training order of samplers.train_indices
        self.randaugment = (BatchedRandAugment(d.randaugment, d.image_size, d.mean, d.interpolation)
                            if train and augment and d.randaugment else None)
        n = len(self.labels)
        self.per_rank = train_count(n, world_size, rank_groups)
        self.indices = None if train else eval_indices(n, rank, world_size).to(device)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order; ``skip_batches`` resumes after that many batches."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        if self.train:
            return self.per_rank // self.batch_size - self.skip_batches
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        if self.train:
            order = to_device(train_indices(len(self.labels), self.seed, self.epoch, self.rank, self.world_size,
                                            self.rank_groups),
                              self.device)
        else:
            order = self.indices
        first = self.skip_batches if self.train else 0
        for i in range(first, first + len(self)):
            # Augmentation is seeded per (epoch, rank, batch): reproducible, and resumable mid-epoch.
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i * self.world_size + self.rank))
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx]
            if self.train and self.augment == "cifar":
                x = random_crop_flip(x, self.size, self.padding, self.hflip, g)
            elif self.train and self.augment == "none" and self.hflip > 0:
                x = random_crop_flip(x, x.shape[-1], 0, self.hflip, g)
            x = x.float()
            if self.randaugment is not None:
                x = self.randaugment(x, g)
            x = self.normalize(x, self._stats).contiguous(memory_format=self.memory_format)
            yield x, self.labels[idx], 0
