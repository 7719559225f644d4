"""Supervised evaluation: loss, top-1 and top-5 accuracy over a whole split."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from visionzoo.progress import Progress


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose target is among the k highest logits, for each k (k is capped
    at the number of classes, so top-5 on a 3-class problem is top-3)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(targets.unsqueeze(1))
    return [hit[:, : min(k, maxk)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None,
    channels_last: bool = False, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, progress: str = "off",
) -> dict:
    """Mean cross-entropy loss, Acc@1 and Acc@5 (percent) of ``model`` over ``loader``.

    Sums stay on the device until the end (one synchronisation per split). ``reduce``, when
    given, sums the totals over processes (each rank evaluates its own shard)."""
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # loss sum, top1, top5, count, unreadable
    bad, names = 0, set()  # names: of the undecodable images, where the reader gives them
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # Inputs in the weights' dtype (float64 for a train.amp=fp64 model, else float32).
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for images, targets, n_bad in Progress(loader, len(loader), "validate", progress, leave=False):
        bad += n_bad
        names.update(getattr(n_bad, "names", ()))
        if images.numel() == 0:
            continue
        images = images.to(device, dtype, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 → fp32; fp64 stays
        top1, top5 = topk_correct(logits, targets)
        loss = F.cross_entropy(logits, targets, reduction="sum")
        # torch.full: a fill kernel; torch.tensor(n, device=...) would be a blocking host→device copy.
        count = torch.full((), len(targets), device=device, dtype=torch.float64)
        totals[:4] += torch.stack([loss.double(), top1.double(), top5.double(), count])
    totals[4] += bad  # summed over ranks with the rest: each rank skipped its own unreadable images
    if reduce is not None:
        totals = reduce(totals)
    loss_sum, top1, top5, count, bad = totals.tolist()
    count = max(count, 1.0)
    return {
        "loss": loss_sum / count, "acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count,
        "samples": int(count), "bad_images": int(bad), "bad_names": sorted(names)[:10],
    }
