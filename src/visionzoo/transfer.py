"""Host → device copies that never make the host wait.

The batched augmentations draw their random numbers on the CPU (the same draws on any device) and
send them to the device once per batch. ``.to(cuda)`` of ordinary (pageable) memory blocks the
host until the copy is done, i.e. until the GPU has finished everything queued before it; a copy
from pinned memory with ``non_blocking=True`` is queued like a kernel and the host goes on. The
caching host allocator keeps the pinned block until the copy has run, so it is safe to drop."""

from __future__ import annotations

import torch


def pins(device: torch.device) -> bool:
    """Whether copies to ``device`` go through pinned memory (CUDA; the CPU needs no copy)."""
    return device.type == "cuda"


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a host tensor) on ``device``, copied asynchronously from pinned memory on CUDA."""
    device = torch.device(device)
    if pins(device) and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def pack(parts: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Host tensors flattened into one ``dtype`` vector (one copy to the device instead of one
    each) and their shapes; ``unpack`` splits the copy on the device again. Choose a ``dtype``
    that holds every value exactly (float32: integers below 2**24)."""
    shapes = [tuple(p.shape) for p in parts]
    flat = torch.cat([p.reshape(-1).to(dtype) for p in parts]) if parts else torch.empty(0, dtype=dtype)
    return flat, shapes


def unpack(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """The views of ``flat`` (on any device) with ``shapes``, in order (no copy, no sync)."""
    out, start = [], 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        out.append(flat[start:start + n].view(shape))
        start += n
    return out


def send(parts: list[torch.Tensor], device: torch.device, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """``parts`` (host tensors) on ``device`` as ``dtype``, in one asynchronous copy."""
    flat, shapes = pack(parts, dtype)
    return unpack(to_device(flat, device), shapes)
