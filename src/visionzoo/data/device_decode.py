"""ImageFolder training data decoded on the training device (``data.decode=device``).

The per-image CPU path (Pillow decode + RandomResizedCrop in loader workers) costs ~3.6 ms per
image per core, which caps ImageNet-style training on a GPU. Here the DataLoader workers only
read file bytes; the training process decodes each batch with ``torchvision.io.decode_jpeg``
on the device (batched nvJPEG on CUDA; the same call decodes on the CPU, which is how the tests
run it), then crops, resizes (antialiased), flips, RandAugments (data.randaugment, batched:
data/batched_randaugment.py) and normalises every image there — or, for DINO, cuts the
multi-crop views of every image there (data/multicrop.py ``BatchedMultiCrop``).

Files nvJPEG is not given — not a plain 8-bit 1- or 3-channel JPEG (PNG, CMYK, arithmetic or
12-bit JPEG), or a JPEG with no end-of-image marker after its last scan (cut off) — are decoded
in the worker with Pillow exactly as ``ImageFolderDataset`` does, then cropped on the device
like the rest; so is anything ``decode_jpeg`` rejects. They are counted in
``loader.cpu_fallbacks``. Files Pillow cannot decode either are dropped and counted as bad,
as ``collate_skip_bad`` does.

Order and multi-rank splitting come from ``ShardSampler``; the crop and flip of batch ``i`` are
drawn from a generator seeded by ``sample_seed(seed, epoch, i * world_size + rank)`` as in the
device-resident loader (data/batched.py), so runs are reproducible and resume mid-epoch."""

from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from visionzoo.data.batched_randaugment import BatchedRandAugment
from visionzoo.data.folder import _DECODE_ERRORS, _to_rgb
from visionzoo.data.multicrop import BatchedMultiCrop, pad_batch
from visionzoo.data.samplers import ShardSampler, sample_seed
from visionzoo.errors import UserError

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
_TRIES = 10  # crop draws before the central-crop fallback, as torchvision's get_params
# torchvision 0.29 deprecates its image decoders in favour of TorchCodec and warns on every call.
_TV_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"
# JPEG start-of-frame markers nvJPEG decodes: baseline, extended sequential, progressive (Huffman).
_SOF_DEVICE = {0xC0, 0xC1, 0xC2}
_SOF_ALL = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # the others: lossless, arithmetic, ...


def check_device_decode(d, multicrop: bool = False) -> None:
    """The recipe settings data.decode=device cannot honour, as one-line user errors."""
    if d.name != "imagefolder":
        raise UserError(f"data.decode=device reads ImageFolder files; data.name={d.name} needs data.decode=cpu")
    if d.augment != "imagenet" and not multicrop:
        raise UserError(f"data.decode=device implements augment=imagenet only; "
                        f"augment={d.augment} needs data.decode=cpu")
    if d.in_chans != 3:
        raise UserError(f"data.decode=device decodes RGB images; data.in_chans={d.in_chans} needs data.decode=cpu")


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
        pos += 2 + length
    return False


def pil_decode(data: bytes) -> torch.Tensor | None:
    """Pillow's decode of ``data`` as a uint8 CHW RGB tensor (ImageFolderDataset's conversion),
    or None when Pillow cannot decode it."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # the full decode here, so truncated data raises inside this try
            rgb = np.array(_to_rgb(img), dtype=np.uint8)
    except _DECODE_ERRORS:
        return None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


class FileBytes(Dataset):
    """Item ``(index, epoch)`` of ``samples`` as ``(bytes, None, target)`` for a device-decodable
    JPEG, ``(None, pixels, target)`` for a file Pillow decoded, or None for an unreadable one."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple) else item
        path, target = self.samples[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        if device_jpeg(data):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), None, target
        pixels = pil_decode(data)
        return None if pixels is None else (None, pixels, target)


def collate_bytes(batch: list) -> dict:
    """The good items of a batch in order: JPEG bytes packed into one buffer (one shared-memory
    block per batch, not one per image), Pillow-decoded pixels as a list, and the bad count."""
    good = [item for item in batch if item is not None]
    jpegs = [b for b, _, _ in good if b is not None]
    return {
        "buffer": torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8),
        "lengths": [len(b) for b in jpegs],
        "pixels": [p for _, p, _ in good if p is not None],
        "is_jpeg": [b is not None for b, _, _ in good],
        "targets": torch.tensor([t for _, _, t in good], dtype=torch.int64),
        "n_bad": len(batch) - len(good),
    }


def crop_params(height: int, width: int, scale, ratio, u: list[list[float]]) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params (top, left, h, w) with its uniform draws taken from ``u``
    (``_TRIES`` rows of 4 numbers in [0, 1)) instead of the global RNG."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for r_area, r_ratio, r_top, r_left in u:
        target_area = area * (scale[0] + (scale[1] - scale[0]) * r_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * r_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(r_top * (height - h + 1)), int(r_left * (width - w + 1)), h, w
    in_ratio = width / height  # central crop, as torchvision falls back
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    images: list[torch.Tensor], size: int, scale, ratio, hflip: float, generator: torch.Generator,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """RandomResizedCrop(size, scale, ratio, antialias) + RandomHorizontalFlip(hflip) of uint8
    CHW images (any sizes, one device) into a float32 [B, C, size, size] batch in 0-255 units.

    The draws come from the CPU ``generator`` (the same crops on any device): ``_TRIES`` x 4
    uniforms per image, then one flip uniform per image."""
    b = len(images)
    u = torch.rand(b, _TRIES, 4, generator=generator, dtype=torch.float64).tolist()
    flip = (torch.rand(b, generator=generator) < hflip).tolist() if hflip > 0 else [False] * b
    mode = "nearest" if interpolation == "nearest" else interpolation
    aa = {} if mode == "nearest" else {"antialias": True, "align_corners": False}
    out = []
    for img, draws, f in zip(images, u, flip):
        top, left, h, w = crop_params(img.shape[-2], img.shape[-1], scale, ratio, draws)
        crop = img[None, :, top:top + h, left:left + w].float()
        crop = F.interpolate(crop, size=(size, size), mode=mode, **aa)
        out.append(crop.flip(-1) if f else crop)
    x = torch.cat(out)
    return x.clamp_(0, 255) if mode == "bicubic" else x  # bicubic overshoots, as Pillow/uint8 clamp


class SupervisedAugment:
    """Decoded images (uint8 CHW, many sizes, on the device) → the normalised training batch:
    RandomResizedCrop + flip, then RandAugment when the recipe has one."""

    def __init__(self, d, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format):
        self.size, self.scale, self.hflip, self.interpolation = d.image_size, tuple(d.crop_scale), d.hflip, d.interpolation
        self.mean = torch.tensor(d.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(d.std, device=device).view(1, -1, 1, 1)
        self.memory_format = memory_format
        self.randaugment = BatchedRandAugment(d.randaugment, d.image_size, d.mean, d.interpolation) if d.randaugment else None

    def __call__(self, images: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        if not images:
            return torch.empty(0)
        x = random_resized_crop(images, self.size, self.scale, RATIO, self.hflip, generator, self.interpolation)
        if self.randaugment is not None:
            x = self.randaugment(x, generator)
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)


class MultiCropAugment:
    """Decoded images (uint8 CHW, many sizes, on the device) → DINO's list of crop batches."""

    def __init__(self, d, dino):
        self.multicrop = BatchedMultiCrop(d, dino)

    def __call__(self, images: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        if not images:
            return []
        x, heights, widths = pad_batch(images)
        return self.multicrop(x, generator, (heights, widths))


class DeviceDecodeLoader:
    """Training batches ``(images, targets, n_bad)`` of an ImageFolderDataset decoded and
    augmented on ``device``; ``batch_size`` images per device, last partial batch dropped.
    ``augment`` turns the decoded images into the batch (default: the recipe's supervised
    augmentation; ``MultiCropAugment`` for DINO, whose "images" are then a list of crop batches).
    Call ``set_epoch(epoch, skip_batches)`` every epoch. ``cpu_fallbacks`` counts the images
    decoded by Pillow instead of ``decode_jpeg``."""

    def __init__(
        self, dataset, batch_size: int, workers: int, device: torch.device, d, seed: int = 0,
        rank: int = 0, world_size: int = 1, memory_format: torch.memory_format = torch.contiguous_format,
        augment=None,
    ):
        check_device_decode(d, multicrop=isinstance(augment, MultiCropAugment))
        self.dataset, self.batch_size, self.device = dataset, batch_size, torch.device(device)
        self.seed, self.rank, self.world_size, self.epoch, self.skip_batches = seed, rank, world_size, 0, 0
        self.augment = augment if augment is not None else SupervisedAugment(d, self.device, memory_format)
        self.cpu_fallbacks = 0
        self.sampler = ShardSampler(len(dataset), True, seed, rank, world_size)
        self.num_workers = max(0, min(workers, os.cpu_count() or 1))
        self.loader = DataLoader(
            FileBytes(dataset.samples), batch_size=batch_size, sampler=self.sampler,
            num_workers=self.num_workers, collate_fn=collate_bytes,
            generator=torch.Generator().manual_seed(seed), drop_last=True,
            persistent_workers=self.num_workers > 0, prefetch_factor=4 if self.num_workers > 0 else None,
        )

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order; ``skip_batches`` resumes after that many batches."""
        self.epoch, self.skip_batches = epoch, skip_batches
        self.sampler.set_epoch(epoch, skip_batches * self.batch_size)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader, start=self.skip_batches):
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i * self.world_size + self.rank))
            yield self.assemble(batch, g)

    def _decode(self, chunks: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """decode_jpeg on the device, batched; one by one (then Pillow) when the batch call fails."""
        if not chunks:
            return []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TV_DEPRECATION, category=DeprecationWarning)
            try:
                return list(decode_jpeg(chunks, device=self.device, mode=ImageReadMode.RGB))
            except RuntimeError:
                pass
            out = []
            for c in chunks:
                try:
                    out.append(decode_jpeg(c, device=self.device, mode=ImageReadMode.RGB))
                except RuntimeError:
                    out.append(None)
        return out

    def assemble(self, batch: dict, generator: torch.Generator) -> tuple:
        """One collated batch of bytes → (augmented batch on the device, targets, n_bad)."""
        chunks = list(torch.split(batch["buffer"], batch["lengths"])) if batch["lengths"] else []
        decoded = iter(zip(chunks, self._decode(chunks)))
        pixels = iter(batch["pixels"])
        images, keep, n_bad = [], [], batch["n_bad"]
        for k, is_jpeg in enumerate(batch["is_jpeg"]):
            if is_jpeg:
                chunk, img = next(decoded)
                if img is None:  # decode_jpeg refused it: the CPU path decides
                    img = pil_decode(chunk.numpy().tobytes())
                    if img is None:
                        n_bad += 1
                        continue
                    self.cpu_fallbacks += 1
                    img = img.to(self.device)
            else:
                img = next(pixels).to(self.device, non_blocking=True)
                self.cpu_fallbacks += 1
            images.append(img)
            keep.append(k)
        targets = batch["targets"][keep]
        return self.augment(images, generator), targets.to(self.device, non_blocking=True), n_bad
