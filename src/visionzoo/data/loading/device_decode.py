"""ImageFolder training data decoded on the training device (``data.decode=device``).

The per-image CPU path (Pillow decode + RandomResizedCrop in loader workers) costs ~3.6 ms per
image per core, which caps ImageNet-style training on a GPU. Here the DataLoader workers only
read file bytes; the training process decodes each batch with ``torchvision.io.decode_jpeg``
on the device (batched nvJPEG on CUDA; the same call decodes on the CPU, which is how the tests
run it; on CUDA on a side stream, see ``decode_on_device``), then crops, resizes (antialiased),
flips, RandAugments (data.randaugment, batched: data/augment/batched_randaugment.py) and normalises the
whole batch at once there — or, for DINO, cuts the multi-crop views of every image there
(data/augment/multicrop_batched.py ``BatchedMultiCrop``). Random draws travel in one pinned, non-blocking copy
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
device-resident loader (data/loading/in_memory.py), so runs are reproducible and resume mid-epoch."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from visionzoo.data.augment import registry
from visionzoo.data.augment.batched import MultiCropAugment
from visionzoo.data.loading.samplers import SampleOrder, ShardSampler, sample_seed
from visionzoo.data.loading.stream_loader import StreamLoader
from visionzoo.data.sources.encoded import FileBytes, pil_decode
from visionzoo.data.sources.shards import ShardStream
from visionzoo.data.sources.table import data_source
from visionzoo.errors import UserError
from visionzoo.transfer import to_device

if TYPE_CHECKING:
    from visionzoo.config import DataConfig
    from visionzoo.data.sources.folder import ImageFolderDataset

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec and warns on every call.
_TV_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


def check_device_decode(d: DataConfig, multicrop: bool = False) -> None:
    """The recipe settings data.decode=device cannot honour, as one-line user errors."""
    if not data_source(d.name).encoded:
        raise UserError(f"data.decode=device reads image files or shards; data.name={d.name} needs data.decode=cpu")
    registry.check(d, registry.DEVICE_DECODE, views=multicrop)
    if d.in_chans != 3:
        raise UserError(f"data.decode=device decodes RGB images; data.in_chans={d.in_chans} needs data.decode=cpu")


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
        self, dataset: ImageFolderDataset | ShardStream, batch_size: int, workers: int, device: torch.device,
        d: DataConfig, order: SampleOrder | None = None,
        memory_format: torch.memory_format = torch.contiguous_format, augment: Callable | None = None,
    ):
        check_device_decode(d, multicrop=isinstance(augment, MultiCropAugment))
        order = order or SampleOrder()
        self.dataset, self.batch_size, self.device = dataset, batch_size, torch.device(device)
        self.seed, self.rank, self.world_size = order.seed, order.rank, order.world_size
        self.epoch, self.skip_batches = 0, 0
        self.augment = augment if augment is not None else registry.batched(d, registry.DEVICE_DECODE, self.device,
                                                                             memory_format)
        self.cpu_fallbacks = 0
        self.num_workers = max(0, min(workers, os.cpu_count() or 1))
        if isinstance(dataset, ShardStream):  # tar / parquet shards: the stream's own loader, bytes only
            self.loader = StreamLoader(dataset.as_bytes(), batch_size, workers, True, order, collate=collate_bytes)
            self.sampler = self.loader.sampler
            return
        self.sampler = ShardSampler(len(dataset), True, order.seed, order.rank, order.world_size, order.rank_groups)
        self.loader = DataLoader(
            FileBytes(dataset.samples), batch_size=batch_size, sampler=self.sampler,
            num_workers=self.num_workers, collate_fn=collate_bytes,
            generator=torch.Generator().manual_seed(order.seed), drop_last=True,
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
        decoded = iter(zip(chunks, self._decode(chunks), strict=True))  # one decoded image (or None) per chunk
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
