"""One outsized photo in a device-decode batch: the resize buffers stay bounded by the crops'
and the output's pixels (not batch x the largest photo), the values are those of the one-buffer
resize, and nvJPEG gets no image over Pillow's decompression-bomb limit (the CPU path's)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

import visionzoo.data.augment.batched as dd
from visionzoo.data.sources.encoded import device_jpeg


def _jpeg(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _buffers(monkeypatch) -> list[int]:
    """Record the elements of every uint8 crop buffer random_resized_crop allocates."""
    sizes, real_zeros = [], torch.zeros

    def zeros(*shape, **kw):
        t = real_zeros(*shape, **kw)
        if kw.get("dtype") == torch.uint8:
            sizes.append(t.numel())
        return t

    monkeypatch.setattr(dd.torch, "zeros", zeros)
    return sizes


def test_one_large_photo_does_not_pad_every_image(monkeypatch):
    g = torch.Generator().manual_seed(0)
    small = [torch.randint(0, 256, (3, 75, 100), dtype=torch.uint8, generator=g) for _ in range(15)]
    large = torch.randint(0, 256, (3, 600, 800), dtype=torch.uint8, generator=g)  # 8x the side of the others
    images = small[:7] + [large] + small[7:]
    args = (images, 16, (0.9, 1.0), (3 / 4, 4 / 3), 0.5)
    sizes = _buffers(monkeypatch)
    out = dd.random_resized_crop(*args, torch.Generator().manual_seed(1))
    # Before: one buffer of 16 x the large crop (about 16 x 3 x 800 x 600).
    assert sum(sizes) <= 1.5 * 3 * (800 * 600 + 15 * 100 * 75) + 16 * 16 * 3 * 16 * 16
    monkeypatch.setattr(dd, "crop_groups", lambda boxes, size: [list(range(len(boxes)))])
    whole = dd.random_resized_crop(*args, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-3)


def test_ordinary_batches_stay_one_group():
    boxes = [(0, 0, h, w) for h, w in [(375, 500), (500, 375), (300, 400), (120, 160)] * 16]
    assert dd.crop_groups(boxes, 224) == [list(range(64))]
    with_large = boxes + [(0, 0, 3000, 4000)]
    assert dd.crop_groups(with_large, 224) == [[64], list(range(64))]  # the photo alone, largest first


def test_no_image_over_pillows_pixel_limit_goes_to_nvjpeg(monkeypatch):
    data = _jpeg(30, 40)
    assert device_jpeg(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30 * 40 - 1)
    assert not device_jpeg(data)  # before: nvJPEG decoded any size


def test_dino_multicrop_pads_an_outsized_photo_on_its_own(monkeypatch):
    from visionzoo.config import load_config

    cfg = load_config("dino_vits16_imagenet", ["data.image_size=16", "dino.local_crop_size=8",
                                               "dino.local_crops_number=2", "dino.solarize_p=0.5"])
    augment = dd.MultiCropAugment(cfg.data, cfg.dino)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8, generator=g) for _ in range(11)]
    images.insert(4, torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8, generator=g))
    sizes = _buffers(monkeypatch)
    crops = augment(images, torch.Generator().manual_seed(1))
    grouped = sum(sizes)
    # Before: 12 images padded to 301 x 401 (4.3 M values); now the photo alone plus 11 small ones.
    assert grouped <= 3 * (301 * 401 + 11 * 31 * 41)
    monkeypatch.setattr(dd, "crop_groups", lambda boxes, size: [list(range(len(boxes)))])
    whole = augment(images, torch.Generator().manual_seed(1))
    assert [c.shape for c in crops] == [c.shape for c in whole] == [(12, 3, 16, 16)] * 2 + [(12, 3, 8, 8)] * 2
    for a, b in zip(crops, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
