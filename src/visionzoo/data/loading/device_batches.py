"""The CPU data path's batches made ready on the training device.

DataLoader workers decode and augment each image and hand over uint8 [B, C, H, W] batches
(stacked from PIL's [H, W, C] bytes, so they are channels_last in memory). ``DeviceBatches``
copies each batch to the device — non-blocking, from the pinned memory DataLoader fills when
``pin_memory`` is on — and converts it to float32, normalises it and lays it out in the model's
memory format there, a whole batch at a time (timm's PrefetchLoader does the same). It yields
what the engines took from the loader before: ``(float images, targets, n_bad)``, or a list of
crop batches for DINO's multi-crop, already on the device, so their ``.to(device)`` is a no-op.
A quarter of the bytes goes through pinned memory and the host-to-device link, and the workers
do no float work."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from visionzoo.data.augment.normalize import Normalize
from visionzoo.data.loading.samplers import SeededDataset
from visionzoo.transfer import to_device


def find_normalize(ds: Dataset) -> Normalize | None:
    """The batched normalisation of the per-image transform inside ``ds`` (looking through
    SeededDataset and Subset wrappers), or None when its images need none."""
    while ds is not None:
        norm = getattr(getattr(ds, "transform", None), "normalize", None)
        if norm is not None:
            return norm
        ds = ds.dataset if isinstance(ds, (Subset, SeededDataset)) else None
    return None


class DeviceBatches:
    """Iterates ``loader``'s batches (a DataLoader, or a shard stream's StreamLoader) on
    ``device``: uint8 images (a tensor, or a list of crop tensors) are normalised there with
    ``normalize`` and laid out as ``memory_format``; float batches (transforms that normalise
    per image) are only moved. Sampler, batch size, worker count and length are the loader's
    (``set_epoch`` as the device-resident loaders)."""

    def __init__(self, loader: DataLoader, device: torch.device, normalize: Normalize | None,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.loader, self.device, self.normalize, self.memory_format = loader, device, normalize, memory_format
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None  # mean, std on the device

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    @property
    def batch_size(self) -> int | None:
        return self.loader.batch_size

    @property
    def num_workers(self) -> int:
        return self.loader.num_workers

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select an epoch's order; ``skip_batches`` resumes after that many batches."""
        if hasattr(self.loader, "set_epoch"):  # a shard stream's loader (data/sources/shards.py)
            self.loader.set_epoch(epoch, skip_batches)
        else:
            self.loader.sampler.set_epoch(epoch, skip_batches * self.loader.batch_size)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """One image batch on the device, float32, normalised, in the memory format."""
        if x.numel() == 0:
            return x
        x = to_device(x, self.device)  # pinned by the DataLoader on CUDA: an asynchronous copy
        if x.dim() == 4:  # the layout is changed on the uint8 bytes; the float ops keep it
            x = x.contiguous(memory_format=self.memory_format)
        if x.dtype == torch.uint8 and self.normalize is not None:
            if self._stats is None:
                self._stats = self.normalize.on(self.device)
            x = self.normalize(x, self._stats)
        return x

    def __iter__(self) -> Iterator[tuple]:
        for images, targets, n_bad in self.loader:
            images = [self.images(c) for c in images] if isinstance(images, list) else self.images(images)
            yield images, to_device(targets, self.device), n_bad
