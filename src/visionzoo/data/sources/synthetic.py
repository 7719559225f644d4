"""data.name=synthetic: random uint8 images at the recipe's crop sizes, with random labels — a
throughput source that costs no decoding (the device-resident loader only normalises them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from visionzoo.data.sources.splits import Splits
from visionzoo.data.sources.tensor_dataset import TensorImageDataset

if TYPE_CHECKING:
    from visionzoo.config import DataConfig

__all__ = ["synthetic_splits"]


def synthetic_splits(d: DataConfig, train: bool) -> Splits:
    """``data.synthetic_samples`` training images at ``data.image_size`` (when ``train``) and a
    quarter as many validation images at ``data.test_size``, ``data.num_classes`` classes; the
    same ones every time (seed 0)."""
    g = np.random.default_rng(0)
    classes = [str(i) for i in range(d.num_classes)]

    def split(n: int, size: int) -> TensorImageDataset:
        images = g.integers(0, 256, (n, size, size, d.in_chans), dtype=np.uint8)
        return TensorImageDataset(images, g.integers(0, d.num_classes, n), classes)

    train_ds = split(d.synthetic_samples, d.image_size) if train else None
    return Splits(train_ds, split(max(d.synthetic_samples // 4, 1), d.test_size), classes)
