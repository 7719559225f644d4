"""Encoded image bytes as the device decoder receives them (loading/device_decode.py): which files
nvJPEG is given, Pillow's decode of the others, and the items of file or shard samples.

nvJPEG is given plain 8-bit 1- or 3-channel Huffman-coded JPEGs with an end-of-image marker after
their last scan; everything else (PNG, CMYK, arithmetic or 12-bit JPEG, a cut-off file) is decoded
here with Pillow exactly as ``ImageFolderDataset`` does."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from visionzoo.data.sources.folder import DECODE_ERRORS, to_rgb

# JPEG start-of-frame markers nvJPEG decodes: baseline, extended sequential, progressive (Huffman).
_SOF_DEVICE = {0xC0, 0xC1, 0xC2}
_SOF_ALL = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # the others: lossless, arithmetic, ...


def device_jpeg(data: bytes) -> bool:
    """Whether ``data`` is a JPEG the device decoder is given: 8-bit, 1 or 3 components, a
    Huffman-coded baseline/progressive frame, and an end-of-image marker after its last scan
    (a cut-off file has none; it goes to Pillow, which reports it as bad)."""
    if data[:3] != b"\xff\xd8\xff":
        return False
    pos, n, frame_ok = 2, len(data), False
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: the header is over
            return frame_ok and data.rfind(b"\xff\xd9") > pos
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF_ALL:
            if marker not in _SOF_DEVICE or pos + 10 > n:
                return False
            frame_ok = data[pos + 4] == 8 and data[pos + 9] in (1, 3)
            if not frame_ok:
                return False
            pixels = int.from_bytes(data[pos + 5:pos + 7], "big") * int.from_bytes(data[pos + 7:pos + 9], "big")
            if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
                return False  # nvJPEG has no limit: Pillow decides, as on the CPU path (a bomb is a bad image)
        pos += 2 + length
    return False


def pil_decode(data: bytes) -> torch.Tensor | None:
    """Pillow's decode of ``data`` as a uint8 CHW RGB tensor (ImageFolderDataset's conversion),
    or None when Pillow cannot decode it."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # the full decode here, so truncated data raises inside this try
            rgb = np.array(to_rgb(img), dtype=np.uint8)
    except DECODE_ERRORS:
        return None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


class FileBytes(Dataset):
    """Item ``(index, epoch)`` of ``samples`` as ``(bytes, None, target)`` for a device-decodable
    JPEG, ``(None, pixels, target)`` for a file Pillow decoded, or None for an unreadable one."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple | None:
        index = item[0] if isinstance(item, tuple) else item
        path, target = self.samples[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        return bytes_item(data, target)


def bytes_item(data: bytes, target: int) -> tuple | None:
    """One file's bytes as a FileBytes item (also the item of tar/parquet shards, sources/shards.py)."""
    if device_jpeg(data):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), None, target
    pixels = pil_decode(data)
    return None if pixels is None else (None, pixels, target)
