"""The device-resident loader augments exactly as the per-image torchvision path does."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visionzoo.data.augment.batched import random_crop_flip
from visionzoo.data.loading.in_memory import InMemoryLoader
from visionzoo.data.loading.samplers import SampleOrder
from visionzoo.data.sources.tensor_dataset import TensorImageDataset


def _all_crops(img: torch.Tensor, size: int, pad: int) -> dict[bytes, tuple[int, int, bool]]:
    """Every output torchvision's RandomCrop(size, padding=pad) + flip can give, by value."""
    p = F.pad(img, (pad, pad, pad, pad))
    out = {}
    for oy in range(p.shape[1] - size + 1):
        for ox in range(p.shape[2] - size + 1):
            c = p[:, oy:oy + size, ox:ox + size]
            out[c.numpy().tobytes()] = (oy, ox, False)
            out[c.flip(-1).numpy().tobytes()] = (oy, ox, True)
    return out


def test_crop_flip_outputs_are_valid_and_uniform():
    img = torch.arange(1, 1 + 6 * 6, dtype=torch.int32).view(1, 6, 6)  # unique pixel values
    size, pad, n = 6, 1, 9000
    valid = _all_crops(img, size, pad)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(img.expand(n, 1, 6, 6).contiguous(), size, pad, 0.5, g)
    counts = Counter(valid[o.numpy().tobytes()] for o in out)  # KeyError = an impossible crop
    offsets = Counter((oy, ox) for (oy, ox, _), c in counts.items() for _ in range(c))
    assert len(offsets) == 9  # every offset of the 3x3 grid occurs
    expected = n / 9
    assert all(abs(c - expected) < 5 * np.sqrt(expected) for c in offsets.values())
    flips = sum(c for (_, _, f), c in counts.items() if f)
    assert abs(flips - n / 2) < 5 * np.sqrt(n / 4)


def test_no_flip_and_no_padding_is_identity():
    x = torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(random_crop_flip(x, 8, 0, 0.0), x)


def _loader(n, batch, train, rank=0, world=1, epoch_seed=0):
    images = np.repeat(np.arange(n, dtype=np.uint8), 4).reshape(n, 2, 2)  # every pixel = index
    ds = TensorImageDataset(images, np.arange(n) % 7, [str(i) for i in range(7)])
    d = SimpleNamespace(augment="none", image_size=2, crop_padding=0, hflip=0.0, mean=[0.0], std=[1.0],
                        normalize="pixel", randaugment="", interpolation="bilinear")
    return InMemoryLoader(ds, batch, train, torch.device("cpu"), d, SampleOrder(epoch_seed, rank, world))


def test_randaugment_follows_the_crop_on_the_device():
    # CIFAR-style data with a RandAugment recipe stays device-resident: crop/flip, then the
    # batched RandAugment, drawn per (epoch, batch) like the crops — the same batch twice.
    rng = np.random.default_rng(0)
    ds = TensorImageDataset(rng.integers(0, 256, (64, 12, 12, 3), dtype=np.uint8), np.arange(64) % 4, list("abcd"))
    base = dict(augment="cifar", image_size=12, crop_padding=2, hflip=0.5, mean=[0.0] * 3, std=[1.0] * 3,
                normalize="pixel", interpolation="bilinear")
    plain = InMemoryLoader(ds, 32, True, torch.device("cpu"), SimpleNamespace(**base, randaugment=""))
    heavy = InMemoryLoader(ds, 32, True, torch.device("cpu"), SimpleNamespace(**base, randaugment="rand-m9-n2-mstd0"))
    (x0, y0, _), (x1, y1, _), (x2, _, _) = next(iter(plain)), next(iter(heavy)), next(iter(heavy))
    assert torch.equal(y0, y1) and torch.equal(x1, x2) and x1.min() >= 0 and x1.max() <= 255
    changed = (x1 - x0).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert 20 <= changed.sum() <= 32  # 2 ops per image at p=0.5: 1/4 of the images keep their crop


def test_train_epoch_covers_each_sample_once_across_ranks():
    n, world = 103, 2
    seen = []
    for rank in range(world):
        loader = _loader(n, 10, True, rank, world)
        loader.set_epoch(3)
        assert len(loader) == (n // world) // 10
        for x, _, bad in loader:
            assert bad == 0 and x.dtype == torch.float32
            seen += x[:, 0, 0, 0].tolist()
    assert len(seen) == len(set(seen)) == world * 5 * 10  # no sample twice


def test_epochs_reshuffle_deterministically():
    a, b = _loader(50, 10, True), _loader(50, 10, True)
    a.set_epoch(0), b.set_epoch(0)
    first = [y.tolist() for _, y, _ in a]
    assert first == [y.tolist() for _, y, _ in b]
    a.set_epoch(1)
    assert first != [y.tolist() for _, y, _ in a]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shards_are_exact(world):
    labels = []
    for rank in range(world):
        labels += [t for _, y, _ in _loader(23, 4, False, rank, world) for t in y.tolist()]
    assert labels == [i % 7 for i in range(23)]  # every sample once, in order, no padding
