"""DINO's multi-crop augmentation and its loader (labels are loaded but never used).

Each image becomes 2 global crops (data.image_size px, scale dino.global_crops_scale) and
dino.local_crops_number local crops (dino.local_crop_size px, scale dino.local_crops_scale),
each flipped, colour-jittered, maybe greyed and blurred; the second global crop may also be
solarized. Probabilities follow the reference (BYOL's asymmetric recipe): blur 1.0 on global
crop 1, 0.1 on global crop 2, 0.5 on local crops; solarize 0.2 on global crop 2 only.

Works on PIL images (ImageFolder) and on uint8 CHW tensors (CIFAR, MNIST-style IDX files);
solarization therefore thresholds at 128 in 0-255 units, before normalisation."""

from __future__ import annotations

import math
import os

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from torchvision.transforms import InterpolationMode, v2


def _blur(sigma: list[float], size: int, p: float) -> v2.Transform:
    """Gaussian blur with sigma drawn uniformly from ``sigma`` (px), applied with probability p.
    The kernel covers ±3 sigma of the largest sigma, capped at the crop size (odd)."""
    k = 2 * math.ceil(3 * sigma[1]) + 1
    k = min(k, size if size % 2 else size - 1)
    return v2.RandomApply([v2.GaussianBlur(max(k, 1), sigma=tuple(sigma))], p=p)


class MultiCropTransform:
    """image → list of crops ``[global_1, global_2, local_1, ..., local_n]`` as float tensors
    normalised with the data's mean/std (0-255 units)."""

    def __init__(self, d, dino):
        interp = InterpolationMode(d.interpolation)
        b, c, s, h = dino.color_jitter
        gsize, lsize = d.image_size, dino.local_crop_size

        def jitter() -> list:
            # Flip, then colour: jitter with prob color_jitter_p, greyscale with prob grayscale_p
            # (both are no-ops on single-channel images, where only brightness/contrast act).
            return [v2.RandomHorizontalFlip(d.hflip),
                    v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=dino.color_jitter_p),
                    v2.RandomGrayscale(dino.grayscale_p)]

        normalise = [v2.ToImage(), v2.ToDtype(torch.float32, scale=False), v2.Normalize(d.mean, d.std)]

        def crop(size: int, scale: list[float]) -> v2.Transform:
            return v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=interp, antialias=True)

        p1, p2, pl = dino.blur_p
        self.global1 = v2.Compose([crop(gsize, dino.global_crops_scale), *jitter(),
                                   _blur(dino.blur_sigma, gsize, p1), *normalise])
        self.global2 = v2.Compose([crop(gsize, dino.global_crops_scale), *jitter(),
                                   _blur(dino.blur_sigma, gsize, p2),
                                   v2.RandomSolarize(128, p=dino.solarize_p), *normalise])
        self.local = v2.Compose([crop(lsize, dino.local_crops_scale), *jitter(),
                                 _blur(dino.blur_sigma, lsize, pl), *normalise])
        self.local_crops_number = dino.local_crops_number

    def __call__(self, image) -> list[torch.Tensor]:
        crops = [self.global1(image), self.global2(image)]
        crops += [self.local(image) for _ in range(self.local_crops_number)]
        return crops


def collate_multicrop(batch: list) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Stack ``(crops, target)`` items into one batch per crop position; drop and count the
    None items (undecodable files). An all-bad batch gives an empty list of crops."""
    good = [item for item in batch if item is not None]
    dropped = len(batch) - len(good)
    if not good:
        return [], torch.empty(0, dtype=torch.int64), dropped
    crops = [torch.stack([item[0][i] for item in good]) for i in range(len(good[0][0]))]
    targets = torch.tensor([t for _, t in good], dtype=torch.int64)
    return crops, targets, dropped


def multicrop_loader(ds: Dataset, batch_size: int, workers: int, seed: int, rank: int = 0,
                     world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """A shuffling loader (``batch_size`` images per device, last partial batch dropped) that
    yields ``(crops, targets, n_bad)``; call ``loader.sampler.set_epoch`` every epoch."""
    if world_size > 1:
        sampler = DistributedSampler(ds, world_size, rank, shuffle=True, seed=seed, drop_last=True)
    else:
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
    workers = max(0, min(workers, os.cpu_count() or 1))
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_multicrop, pin_memory=pin_memory, drop_last=True,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
