"""A loader for data sets that fit in memory (CIFAR, MNIST): the whole uint8 split lives on the
training device, and each batch is cropped, flipped, RandAugmented (when the recipe has it) and
normalised there with tensor ops.

No worker processes and no per-image Python: on a GPU the split is uploaded once; on a CPU
it is still ~3x faster than per-image transforms. The augmentation is the in-memory column of
the table of presets (data/augment/registry.py), which says how close each preset comes to the
per-image path (``presets.train_transform``) given the same draws."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from visionzoo.data.augment import registry
from visionzoo.data.loading.samplers import SampleOrder, eval_indices, sample_seed, train_count, train_indices
from visionzoo.transfer import to_device

if TYPE_CHECKING:
    from visionzoo.config import DataConfig, DinoConfig
    from visionzoo.data.sources.tensor_dataset import TensorImageDataset


class InMemoryLoader:
    """Iterates ``(images, targets, 0)`` batches from a TensorImageDataset held on ``device``.

    Samples are split over ranks exactly as the DataLoader path splits them (data/loading/samplers.py):
    call ``set_epoch`` every epoch; training drops the last partial batch; evaluation walks each
    rank's contiguous shard in order, no sample repeated."""

    def __init__(
        self, dataset: TensorImageDataset, batch_size: int, train: bool, device: torch.device, d: DataConfig,
        order: SampleOrder | None = None, memory_format: torch.memory_format = torch.contiguous_format,
        augment: bool = True,
    ):
        order = order or SampleOrder()
        self.dataset = dataset
        self.images = dataset.images.to(device)
        self.labels = dataset.labels.to(device)
        self.batch_size, self.train, self.device = batch_size, train, device
        self.seed, self.rank, self.world_size = order.seed, order.rank, order.world_size
        self.epoch, self.skip_batches = 0, 0
        # Training batches: the preset (and RandAugment) of the config; evaluation and synthetic
        # data: the normalisation (data.normalize) alone.
        self.augment = (registry.batched(d, registry.IN_MEMORY, device, memory_format) if train and augment
                        else registry.only_normalize(d, device, memory_format))
        self.rank_groups = order.rank_groups  # the training order of samplers.train_indices
        n = len(self.labels)
        self.per_rank = train_count(n, order.world_size, order.rank_groups)
        self.indices = None if train else eval_indices(n, order.rank, order.world_size).to(device)

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
            yield self.augment(self.images[idx], g), self.labels[idx], 0


class InMemoryMultiCropLoader:
    """Multi-crop batches ``(crops, labels, 0)`` of a TensorImageDataset kept on
    ``device``, in the order of the shared shard rule (``samplers.train_indices``; call
    ``set_epoch``); the last partial batch is dropped."""

    def __init__(self, dataset: TensorImageDataset, batch_size: int, device: torch.device, d: DataConfig,
                 dino: DinoConfig, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.images, self.labels = dataset.images.to(device), dataset.labels.to(device)
        self.batch_size, self.device, self.seed, self.rank, self.world_size = batch_size, device, seed, rank, world_size
        self.epoch, self.skip_batches = 0, 0
        self.augment = registry.multicrop(d, dino, registry.IN_MEMORY)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order; ``skip_batches`` resumes after that many batches."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        return len(self.labels) // self.world_size // self.batch_size - self.skip_batches

    def __iter__(self):
        order = to_device(train_indices(len(self.labels), self.seed, self.epoch, self.rank, self.world_size),
                          self.device)
        for i in range(self.skip_batches, self.skip_batches + len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            # Each rank's batch i of the epoch draws its own augmentation.
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i * self.world_size + self.rank))
            yield self.augment(self.images[idx], g), self.labels[idx], 0
