"""One outsized photo in a device-decode batch: the resize buffers stay bounded by the crops'
and the output's pixels (not batch x the largest photo), the values are those of the one-buffer
resize, and nvJPEG gets no image over Pillow's decompression-bomb limit (the CPU path's)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

import visionzoo.data.device_decode as dd


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
    assert dd.device_jpeg(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30 * 40 - 1)
    assert not dd.device_jpeg(data)  # before: nvJPEG decoded any size
