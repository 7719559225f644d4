"""A linear probe on a frozen backbone (facebookresearch/dino eval_linear.py): a linear layer on
frozen features (for ViTs: the [CLS] tokens of the last N blocks, concatenated), SGD momentum
0.9 without weight decay, cosine per epoch, the reference's crops (knn.py's probe_splits)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from visionzoo.data.loading.build import build_loader
from visionzoo.engine.evaluation.knn import (
    FeatureFn,
    extract_features,
    probe_features,
    probe_splits,
    reference_eval_transform,
)
from visionzoo.engine.evaluation.topk import topk_correct
from visionzoo.errors import UserError

if TYPE_CHECKING:
    from visionzoo.config import DataConfig, DinoConfig


def train_linear(
    backbone: nn.Module, d: DataConfig, dino: DinoConfig, device: torch.device, amp_dtype: torch.dtype | None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train a linear probe on frozen ``backbone`` features; return val Acc@1/Acc@5 (%) after the
    last epoch (the reference prints the best epoch's; a single final figure avoids picking
    on the validation set)."""
    fn = probe_features(dino.linear_n_last_blocks, dino.linear_avgpool)
    train_ds, val_ds, classes = probe_splits(d)
    batch = dino.linear_batch_size
    val_f, val_y = extract_features(backbone, val_ds, d.batch_size, d.workers, device, amp_dtype, fn)
    cached = None
    if not dino.linear_augment:  # features of the un-augmented training images, computed once
        if hasattr(train_ds, "transform"):
            train_ds.transform = reference_eval_transform(d)
        cached = extract_features(backbone, train_ds, d.batch_size, d.workers, device, amp_dtype, fn)
    probe = nn.Linear(val_f.shape[1], len(classes)).to(device)
    nn.init.normal_(probe.weight, std=0.01)
    nn.init.zeros_(probe.bias)
    base_lr = dino.linear_lr * batch / 256  # the reference's linear scaling rule
    opt = torch.optim.SGD(probe.parameters(), lr=base_lr, momentum=0.9, weight_decay=0.0)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    loader = None if cached else build_loader(train_ds, batch, d.workers, train=True, device=device)
    if loader is not None and len(loader) == 0:
        raise UserError(f"the training split ({len(train_ds)} images) is smaller than one probe "
                        f"batch (dino.linear_batch_size={batch})")
    gen = torch.Generator().manual_seed(0)
    backbone.eval()  # frozen: features only, for every epoch
    for epoch in range(dino.linear_epochs):
        for g in opt.param_groups:  # CosineAnnealingLR(T_max=epochs), stepped once per epoch
            g["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * epoch / dino.linear_epochs))
        total, count = torch.zeros((), device=device), 0
        if cached is not None:
            feats, labels = cached
            perm = torch.randperm(len(labels), generator=gen).to(device)
            batches = ((feats[perm[i:i + batch]], labels[perm[i:i + batch]]) for i in range(0, len(perm), batch))
        else:
            loader.sampler.set_epoch(epoch)  # a new order (and new augmentations) every epoch
            batches = _feature_batches(backbone, loader, device, autocast, fn)
        for x, y in batches:
            loss = F.cross_entropy(probe(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.detach() * len(y), count + len(y)  # no device sync per step
        log(f"linear epoch {epoch + 1}/{dino.linear_epochs}: loss {float(total) / max(count, 1):.4f} "
            f"lr {opt.param_groups[0]['lr']:.4g}")
    with torch.no_grad():
        c1, c5 = topk_correct(probe(val_f), val_y)
    n = max(len(val_y), 1)
    return {"acc1": 100.0 * float(c1) / n, "acc5": 100.0 * float(c5) / n,
            "samples": len(val_y), "features": val_f.shape[1], "classes": len(classes)}


def _feature_batches(backbone: nn.Module, loader: Iterable, device: torch.device, autocast: AbstractContextManager,
                     fn: FeatureFn) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features, labels) of augmented training batches through the frozen backbone."""
    for images, targets, _ in loader:
        if images.numel() == 0:
            continue
        with torch.no_grad(), autocast:
            f = fn(backbone, images.to(device, non_blocking=True))
        yield f.float(), targets.to(device)
