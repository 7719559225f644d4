"""ImageFolder training data decoded on the training device (``data.decode=device``).

The per-image CPU path (Pillow decode + RandomResizedCrop in loader workers) costs ~3.6 ms per
image per core, which caps ImageNet-style training on a GPU. Here the DataLoader workers only
read file bytes; the training process decodes each batch with ``torchvision.io.decode_jpeg``
on the device (batched nvJPEG on CUDA; the same call decodes on the CPU, which is how the tests
run it; on CUDA on a side stream, see ``decode_on_device``), then crops, resizes (antialiased),
flips, RandAugments (data.randaugment, batched: data/batched_randaugment.py) and normalises the
whole batch at once there — or, for DINO, cuts the multi-crop views of every image there
(data/multicrop.py ``BatchedMultiCrop``). Random draws travel in one pinned, non-blocking copy
per batch: nothing in the step makes the host wait for the device.

Files nvJPEG is not given — not a plain 8-bit 1- or 3-channel JPEG (PNG, CMYK, arithmetic or
12-bit JPEG), or a JPEG with no end-of-image marker after its last scan (cut off) — are decoded
in the worker with Pillow exactly as ``ImageFolderDataset`` does, then cropped on the device
like the rest; so is any file ``decode_jpeg`` rejects (found by halving the failing batch call:
the other files stay in batched calls). They are counted in
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
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from visionzoo.data.batched_randaugment import BatchedRandAugment
from visionzoo.data.folder import _DECODE_ERRORS, _to_rgb
from visionzoo.data import multicrop
from visionzoo.data.multicrop import BatchedMultiCrop, pad_batch
from visionzoo.data.samplers import ShardSampler, sample_seed
from visionzoo.data.shards import ShardStream, StreamLoader
from visionzoo.data.transfer import send, to_device
from visionzoo.data.transforms import central_box
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
    if d.name not in ("imagefolder", "webdataset", "hfds"):
        raise UserError(f"data.decode=device reads image files or shards; data.name={d.name} needs data.decode=cpu")
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
        return bytes_item(data, target)


def bytes_item(data: bytes, target: int) -> tuple | None:
    """One file's bytes as a FileBytes item (also the item of tar/parquet shards, data/shards.py)."""
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
    return central_box(height, width, ratio)


def _aa_filter(x: torch.Tensor, mode: str) -> torch.Tensor:
    """torch's antialiasing kernels (``F.interpolate(..., antialias=True)``): the triangle for
    bilinear, Keys' cubic with a = -0.5 (Pillow's) for bicubic."""
    x = x.abs()
    if mode == "bilinear":
        return (1 - x).clamp(min=0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(n_in: torch.Tensor, out: int, cap: int, mode: str, flip: torch.Tensor | None = None) -> torch.Tensor:
    """[B, out, cap] matrices that resize B signals of lengths ``n_in`` ([B] float, on the device;
    stored in the first ``n_in`` of ``cap`` entries) to ``out`` samples as
    ``F.interpolate(mode, antialias=True)`` does (``nearest``: torch's legacy nearest), the rows of
    images in ``flip`` in reverse order. Built on the device from the sizes: nothing is read back."""
    n = n_in.float().view(-1, 1, 1)
    i = torch.arange(out, device=n_in.device, dtype=torch.float32).view(1, -1, 1)
    if flip is not None:
        i = torch.where(flip.bool().view(-1, 1, 1), out - 1 - i, i)
    j = torch.arange(cap, device=n_in.device, dtype=torch.float32).view(1, 1, -1)
    scale = n / out
    if mode == "nearest":
        return (j == torch.minimum(torch.floor(i * scale), n - 1)).float()
    # torch's _compute_weights_aa: taps xmin .. xmin + xsize - 1 around the centre, normalised.
    half = 1.0 if mode == "bilinear" else 2.0  # interp_size / 2
    support = torch.where(scale >= 1, half * scale, torch.full_like(scale, half))
    invscale = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    center = scale * (i + 0.5)
    lo = torch.trunc(center - support + 0.5).clamp(min=0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), n)
    w = _aa_filter((j - center + 0.5) * invscale, mode) * ((j >= lo) & (j < hi))
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total == 0, torch.ones_like(total), total)


def random_resized_crop(
    images: list[torch.Tensor], size: int, scale, ratio, hflip: float, generator: torch.Generator,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """RandomResizedCrop(size, scale, ratio, antialias) + RandomHorizontalFlip(hflip) of uint8
    CHW images (any sizes, one device) into a float32 [B, C, size, size] batch in 0-255 units.

    The draws come from the CPU ``generator`` (the same crops on any device): ``_TRIES`` x 4
    uniforms per image, then one flip uniform per image; the crop boxes are computed on the host.
    The batch is then resized at once (or, with an outsized photo in it, in groups of similar
    crop sizes, ``crop_groups``: memory stays bounded by the crops' and the output's pixels):
    each image's crop is copied into one uint8 batch
    (one copy per image: nvJPEG returns separate tensors), and resized by two batched matrix
    products with the weights of torch's antialiased bilinear/bicubic (or nearest) resize, the
    flip folded into the horizontal weights; float32 copies of at most ``multicrop.CHUNK_BYTES``.
    Equal to ``F.interpolate(crop, antialias=True)`` per image up to float32 rounding (1e-3 of a
    grey level in the tests); torchvision's uint8 resize rounds to integers (within 1 level)."""
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        raise UserError(f"data.interpolation={interpolation} is not bilinear, bicubic or nearest")
    b, c, device = len(images), images[0].shape[0], images[0].device
    u = torch.rand(b, _TRIES, 4, generator=generator, dtype=torch.float64).tolist()
    flip = torch.rand(b, generator=generator) < hflip if hflip > 0 else torch.zeros(b, dtype=torch.bool)
    boxes = [crop_params(img.shape[-2], img.shape[-1], scale, ratio, draws) for img, draws in zip(images, u)]
    hs, ws, flips = send([torch.tensor([bx[2] for bx in boxes]), torch.tensor([bx[3] for bx in boxes]), flip], device)
    groups = crop_groups(boxes, size)
    if len(groups) == 1:
        out = _resize_crops(images, boxes, range(b), hs, ws, flips, size, interpolation)
    else:  # an outsized photo is resized on its own, not padded into every other image's buffer
        out = torch.empty(b, c, size, size, device=device)
        for group in groups:
            idx = torch.tensor(group, device=device)
            out[idx] = _resize_crops(images, boxes, group, hs[idx], ws[idx], flips[idx], size, interpolation)
    return out.clamp_(0, 255) if interpolation == "bicubic" else out  # bicubic overshoots, as Pillow/uint8 clamp


def crop_groups(boxes: list[tuple[int, int, int, int]], size: int, slack: float = 1.5) -> list[list[int]]:
    """The images of a batch in groups resized together: the crops of a group are padded to its
    largest height and width, so one 4000x3000 photo among 500x375 ones would make the buffer
    of every image 4000x3000 (1.8 GB at batch 64). Largest crop first, an image joins the
    current group while the padded buffer stays within ``slack`` x the group's real crop
    pixels, or within 16 output images per image (so ordinary batches stay one group). The
    buffers together then hold at most ``slack`` x the crops' pixels plus 16 x the output's."""
    order = sorted(range(len(boxes)), key=lambda k: boxes[k][2] * boxes[k][3], reverse=True)
    groups: list[list[int]] = []
    hmax = wmax = area = 0
    for k in order:
        h, w = boxes[k][2], boxes[k][3]
        if groups:
            n = len(groups[-1]) + 1
            padded = n * max(hmax, h) * max(wmax, w)
            if padded <= max(slack * (area + h * w), 16 * n * size * size):
                groups[-1].append(k)
                hmax, wmax, area = max(hmax, h), max(wmax, w), area + h * w
                continue
        groups.append([k])
        hmax, wmax, area = h, w, h * w
    return [sorted(g) for g in groups]


def _resize_crops(images, boxes, group, hs, ws, flips, size: int, interpolation: str) -> torch.Tensor:
    """The crops ``boxes[k]`` of ``images[k]`` for k in ``group``, copied into one uint8 buffer
    of the group's largest crop and resized as a batch: float32 [len(group), C, size, size]."""
    c, device = images[group[0]].shape[0], images[group[0]].device
    hc, wc = max(boxes[k][2] for k in group), max(boxes[k][3] for k in group)
    crops = torch.zeros(len(group), c, hc, wc, dtype=torch.uint8, device=device)
    for j, k in enumerate(group):
        top, left, h, w = boxes[k]
        crops[j, :, :h, :w] = images[k][:, top:top + h, left:left + w]
    wy = resize_weights(hs, size, hc, interpolation)  # [B, S, hc]
    wx = resize_weights(ws, size, wc, interpolation, flips).transpose(1, 2)  # [B, wc, S]
    n, per = len(group), max(1, multicrop.CHUNK_BYTES // max(1, c * hc * wc * 4))
    return torch.cat([wy[i:i + per, None] @ crops[i:i + per].float() @ wx[i:i + per, None] for i in range(0, n, per)])


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
        self.size = d.image_size

    def __call__(self, images: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        if not images:
            return []
        groups = crop_groups([(0, 0, int(i.shape[-2]), int(i.shape[-1])) for i in images], self.size)
        if len(groups) == 1:
            x, heights, widths = pad_batch(images)
            return self.multicrop(x, generator, (heights, widths))
        # An outsized photo is padded on its own, not every image of the batch to its size.
        sizes = (torch.tensor([int(i.shape[-2]) for i in images]), torch.tensor([int(i.shape[-1]) for i in images]))
        padded = [(group, pad_batch([images[k] for k in group])[0]) for group in groups]
        return self.multicrop(padded, generator, sizes)


def decode_batch(chunks: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """``decode_jpeg`` of the JPEG byte tensors ``chunks`` on ``device``, batched; None for the
    files it rejects. A batch call fails as a whole, so a failing batch is split in halves and
    retried: one bad file costs about 2 log2(n) batched calls and only it goes to Pillow (one
    call per file would cost a device round trip per image)."""
    if not chunks:
        return []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TV_DEPRECATION, category=DeprecationWarning)
        try:
            return list(decode_jpeg(chunks, device=device, mode=ImageReadMode.RGB))
        except torch.OutOfMemoryError:
            raise  # the device is full, not the file bad: splitting would hide it and drop good images
        except RuntimeError:
            if len(chunks) == 1:
                return [None]
    half = len(chunks) // 2
    return decode_batch(chunks[:half], device) + decode_batch(chunks[half:], device)


_SIDE_STREAMS: dict = {}


def decode_on_device(chunks: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """``decode_batch`` with nvJPEG's memory kept safe on CUDA (pytorch/vision#9606): the outputs
    are allocated on the caller's stream but written on nvJPEG's own, which does not wait for the
    caller's, so a block freed by the caller and still read by its queued kernels could be
    overwritten. So decoding runs on a side stream that first waits for the current one (its
    memory pool then only hands out blocks whose users have finished), the current stream waits
    for the side stream before using the images, and each image is recorded on the current
    stream (the allocator keeps it until the kernels queued there have run)."""
    device = torch.device(device)
    if device.type != "cuda":
        return decode_batch(chunks, device)
    key = device.index if device.index is not None else torch.cuda.current_device()
    side = _SIDE_STREAMS.get(key)
    if side is None:
        side = _SIDE_STREAMS[key] = torch.cuda.Stream(device=device)
    current = torch.cuda.current_stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        images = decode_batch(chunks, device)
    current.wait_stream(side)
    for img in images:
        if img is not None:
            img.record_stream(current)
    return images


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
        self.num_workers = max(0, min(workers, os.cpu_count() or 1))
        if isinstance(dataset, ShardStream):  # tar / parquet shards: the stream's own loader, bytes only
            self.loader = StreamLoader(dataset.as_bytes(), batch_size, workers, True, seed, rank, world_size,
                                       collate=collate_bytes)
            self.sampler = self.loader.sampler
            return
        self.sampler = ShardSampler(len(dataset), True, seed, rank, world_size)
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
        return decode_on_device(chunks, self.device)

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
                    img = to_device(img, self.device)
            else:
                img = to_device(next(pixels), self.device)
                self.cpu_fallbacks += 1
            images.append(img)
            keep.append(k)
        targets = batch["targets"][keep]
        return self.augment(images, generator), to_device(targets, self.device), n_bad
