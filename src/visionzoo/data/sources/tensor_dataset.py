"""A Dataset over images already in memory (MNIST, CIFAR), kept as one uint8 tensor."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["TensorImageDataset"]


class TensorImageDataset(Dataset):
    """In-memory uint8 images as a contiguous [N, C, H, W] tensor plus int64 labels.

    ``images`` is a numpy uint8 array [N, H, W] (greyscale, C=1 is added) or
    [N, H, W, C]. ``transform`` receives one uint8 [C, H, W] tensor.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | Sequence[int],
                 classes: list[str],
                 transform: Callable[[torch.Tensor], Any] | None = None) -> None:
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if images.ndim not in (3, 4):
            raise ValueError(f"images must be [N,H,W] or [N,H,W,C], got shape {images.shape}")
        arr = np.ascontiguousarray(images)
        if not arr.flags.writeable:
            # torch.from_numpy warns on read-only arrays (np.frombuffer results).
            arr = arr.copy()
        tensor = torch.from_numpy(arr)
        # NHWC -> NCHW copied to contiguous memory, so each item is a cheap
        # slice and transforms get a normal CHW tensor.
        self.images: torch.Tensor = (tensor.unsqueeze(1) if arr.ndim == 3
                                     else tensor.permute(0, 3, 1, 2).contiguous())
        self.labels: torch.Tensor = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.classes: list[str] = list(classes)
        self.transform = transform
        # A plain list, like torchvision datasets, for samplers and class counts.
        self.targets: list[int] = self.labels.tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.images[index]
        return (self.transform(img) if self.transform else img), int(self.labels[index])
