"""Collate functions: a loader's items (one per image) into one batch, with the unreadable
items (None: a file or sample that could not be decoded) dropped and counted."""

from __future__ import annotations

import torch

from visionzoo.data.sources.folder import Unreadable


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack [C, H, W] images of one shape into [B, C, H, W], in [B, H, W, C] memory
    (channels_last) when C > 1: for images from PIL, which view [H, W, C] bytes, each is then
    a plain copy."""
    first = images[0]
    if first.dim() != 3 or first.shape[0] == 1 or any(i.shape != first.shape for i in images):
        return torch.stack(images)  # (stack names the mismatch, if any)
    out = torch.empty((len(images), *first.shape[1:], first.shape[0]), dtype=first.dtype)
    for o, i in zip(out, images, strict=True):  # out has a row per image
        o.copy_(i.permute(1, 2, 0))
    return out.permute(0, 3, 1, 2)


def collate_skip_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the good (image tensor, target) items; return (images, targets, n_dropped).

    ``None`` items (undecodable files) are dropped and counted. If all are
    bad, images and targets are empty tensors of shape [0]; skip such batches.
    """
    good = [item for item in batch if item is not None]
    positions = tuple(i for i, item in enumerate(batch) if item is None)
    dropped = Unreadable(len(batch) - len(good), getattr(batch, "bad", ()), positions)  # names from ImageFolder
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), dropped
    images = stack_images([img for img, _ in good])
    targets = torch.tensor([t for _, t in good], dtype=torch.int64)
    return images, targets, dropped


def collate_multicrop(batch: list) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Stack ``(crops, target)`` items into one batch per crop position; drop and count the
    None items (undecodable files). An all-bad batch gives an empty list of crops."""
    good = [item for item in batch if item is not None]
    dropped = Unreadable(len(batch) - len(good), getattr(batch, "bad", ()))  # names from ImageFolder
    if not good:
        return [], torch.empty(0, dtype=torch.int64), dropped
    crops = [stack_images([item[0][i] for item in good]) for i in range(len(good[0][0]))]
    targets = torch.tensor([t for _, t in good], dtype=torch.int64)
    return crops, targets, dropped
