"""Random images for throughput runs without files (``--data synthetic``)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class SyntheticDataset(Dataset):
    """``n`` reproducible random images, already normalised, with random labels.

    Each item is generated from its index, so any worker or rank produces the same sample.
    """

    def __init__(self, n: int, shape: tuple[int, int, int], num_classes: int, seed: int = 0):
        self.n, self.shape, self.num_classes, self.seed = n, shape, num_classes, seed
        self.classes = [str(i) for i in range(num_classes)]
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, num_classes, (n,), generator=g).tolist()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(self.shape, generator=g), self.targets[i]
