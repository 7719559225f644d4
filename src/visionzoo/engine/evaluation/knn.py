"""Evaluating a frozen backbone without fine-tuning it: weighted k-NN and a linear probe
(facebookresearch/dino eval_knn.py and eval_linear.py).

k-NN: L2-normalised features of the training split (eval preprocessing, no augmentation) are
the memory bank; each validation image votes over its k most similar training images with
weight exp(cosine / T). Similarities are computed a chunk of queries at a time, so memory stays
at ``max_elements`` floats whatever the split sizes. The number of classes comes from the data.

Linear probe: a linear layer on frozen features (for ViTs: the [CLS] tokens of the last N
blocks, concatenated), SGD momentum 0.9 without weight decay, cosine per epoch."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, IterableDataset, Subset

from visionzoo.data.augment.presets import eval_transform, train_transform
from visionzoo.data.loading.build import build_datasets, build_loader
from visionzoo.data.loading.samplers import SampleOrder
from visionzoo.errors import UserError
from visionzoo.progress import Progress

if TYPE_CHECKING:
    from visionzoo.config import DataConfig, DinoConfig

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def cls_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's own output (a timm ViT built with num_classes=0: the final [CLS] token, or
    the mean patch token with ``global_pool="avg"``)."""
    return model(x)


def probe_features(n_last_blocks: int, avgpool: bool) -> FeatureFn:
    """The linear probe's input: for ViTs, the normed [CLS] tokens of the last ``n_last_blocks``
    blocks (plus the mean patch token of the last block with ``avgpool``); other backbones: their
    output."""
    def fn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if n_last_blocks < 1 or not hasattr(model, "forward_intermediates"):
            return model(x)
        depth = len(getattr(model, "blocks", ())) or n_last_blocks  # a shallower model gives all its blocks
        inter = model.forward_intermediates(x, indices=min(n_last_blocks, depth), return_prefix_tokens=True, norm=True,
                                            output_fmt="NLC", intermediates_only=True)
        out = [prefix[:, 0] for _, prefix in inter]
        if avgpool:
            out.append(inter[-1][0].mean(dim=1))
        return torch.cat(out, dim=-1)
    return fn


def reference_eval_transform(d: DataConfig) -> Callable:
    """DINO's evaluation preprocessing (eval_knn.py and eval_linear.py: Resize(256, bicubic) +
    CenterCrop(224)): the recipe's resize and crop sizes, bicubic whatever data.interpolation."""
    return eval_transform(replace(d, interpolation="bicubic"))


def reference_probe_transform(d: DataConfig) -> Callable:
    """DINO's linear-probe training augmentation (eval_linear.py: RandomResizedCrop(224), whose
    default interpolation is bilinear, + RandomHorizontalFlip): the recipe's crop size, scale and
    flip, bilinear whatever data.interpolation (the recipe's is the pre-training crops')."""
    return train_transform(replace(d, interpolation="bilinear", randaugment=None))


def eval_splits(d: DataConfig) -> tuple[Dataset, Dataset, list[str]]:
    """The training split with *evaluation* preprocessing (the k-NN memory bank) and the
    validation split, as build_datasets reads them, both preprocessed as the reference's
    eval_knn.py (``reference_eval_transform``)."""
    splits = build_datasets(d, train=True)
    for ds in (splits.train, splits.val):
        if hasattr(ds, "transform"):  # synthetic data has no transform to swap
            ds.transform = reference_eval_transform(d)
    return splits.train, splits.val, splits.classes


def probe_splits(d: DataConfig) -> tuple[Dataset, Dataset, list[str]]:
    """The linear probe's training split (``reference_probe_transform``) and validation split
    (``reference_eval_transform``)."""
    splits = build_datasets(d, train=True)
    if hasattr(splits.train, "transform"):
        splits.train.transform = reference_probe_transform(d)
    if hasattr(splits.val, "transform"):
        splits.val.transform = reference_eval_transform(d)
    return splits.train, splits.val, splits.classes


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate the rows of ``t`` from every rank (ranks may hold different row counts)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


@torch.no_grad()
def extract_features(
    model: nn.Module, ds: Dataset, batch_size: int, workers: int, device: torch.device,
    amp_dtype: torch.dtype | None = None, fn: FeatureFn = cls_features,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 features [N, D] and labels [N] of ``ds`` (undecodable images left out), on
    ``device``. Under torch.distributed each rank extracts every world_size-th image and the
    results are all-gathered, so every rank ends with the whole split (in rank-major order)."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if world > 1 and not isinstance(ds, IterableDataset):  # shard streams split themselves by rank
        ds, rank, world = Subset(ds, range(rank, len(ds), world)), 0, 1
    loader = build_loader(ds, batch_size, workers, train=False, order=SampleOrder(0, rank, world), device=device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    feats, labels = [], []
    main_rank = not dist.is_initialized() or dist.get_rank() == 0
    for images, targets, _ in Progress(loader, len(loader), "features", enabled=main_rank, leave=False):
        if images.numel() == 0:
            continue
        with autocast:
            f = fn(model, images.to(device, non_blocking=True))
        feats.append(f.float())
        labels.append(targets.to(device))
    # Every rank agrees before gathering: a rank whose share had no readable image contributes no
    # rows (it must still join the gathers, or the others wait for it until the timeout).
    width = torch.tensor([feats[0].shape[1] if feats else 0], device=device)
    if dist.is_initialized():
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
    if int(width.item()) == 0:
        raise UserError("no readable images to extract features from")
    f = torch.cat(feats) if feats else torch.zeros((0, int(width.item())), device=device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=device)
    return _gather(f), _gather(y)


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor,
    ks: list[int], temperature: float, num_classes: int, max_elements: int = 2**25,
) -> dict[int, tuple[float, float]]:
    """Weighted k-NN accuracy: ``{k: (top1 %, top5 %)}`` for every k in ``ks``.

    Features must already be L2-normalised. Neighbour j of a query votes for its label with
    weight exp(sim_j / temperature). Classes are ranked as the reference ranks them (eval_knn.py,
    ``knn_classifier``): ``torch.sort`` of the vote vector in descending order, top-1 its first
    class, top-5 a hit among its first min(5, k). When fewer than 5 classes got votes, the rest
    of those 5 are zero-vote classes in the order that sort gives ties (on the CPU, for more than
    16 classes, not the class order; ``topk`` orders them otherwise): the same call on the same
    device gives the same classes for the same votes, run after run. One top-k of the largest k
    serves every smaller k."""
    n_train = train_feats.shape[0]
    maxk = min(max(ks), n_train)
    chunk = max(1, max_elements // max(n_train, 1))
    hits = {k: [0, 0] for k in ks}
    for start in range(0, test_feats.shape[0], chunk):
        q, y = test_feats[start:start + chunk], test_labels[start:start + chunk]
        sim, idx = (q @ train_feats.T).topk(maxk, dim=1)  # sorted, most similar first
        neighbours, weights = train_labels[idx], (sim / temperature).exp()
        for k in ks:
            kk = min(k, maxk)
            votes = torch.zeros(q.shape[0], num_classes, device=q.device)
            votes.scatter_add_(1, neighbours[:, :kk], weights[:, :kk])
            pred = torch.sort(votes, dim=1, descending=True).indices[:, :min(5, kk, num_classes)]
            correct = pred == y[:, None]
            hits[k][0] += int(correct[:, 0].sum())
            hits[k][1] += int(correct.any(dim=1).sum())
    n = max(test_feats.shape[0], 1)
    return {k: (100.0 * h1 / n, 100.0 * h5 / n) for k, (h1, h5) in hits.items()}


def knn_eval(backbone: nn.Module, d: DataConfig, dino: DinoConfig, device: torch.device, amp_dtype: torch.dtype | None,
             batch_size: int, ks: list[int] | None = None) -> tuple[dict[int, tuple[float, float]], list[str]]:
    """Extract the normalised features of both splits of ``d`` and run ``knn_classify`` for
    ``ks`` (default: dino.knn_k)."""
    train_ds, val_ds, classes = eval_splits(d)
    cap = getattr(dino, "knn_max_train", 0)
    if cap and not isinstance(train_ds, IterableDataset) and len(train_ds) > cap:
        step = len(train_ds) / cap  # evenly spaced: every class of an ordered split keeps its share
        train_ds = Subset(train_ds, [int(i * step) for i in range(cap)])
    if not dist.is_initialized() or dist.get_rank() == 0:
        n_train = len(train_ds) if not isinstance(train_ds, IterableDataset) else "all"
        n_val = len(val_ds) if not isinstance(val_ds, IterableDataset) else "all"
        print(f"k-NN: features of {n_train} training and {n_val} validation images"
              + ("" if cap else " (dino.knn_max_train=N uses N training images)"), flush=True)
    train_f, train_y = extract_features(backbone, train_ds, batch_size, d.workers, device, amp_dtype)
    val_f, val_y = extract_features(backbone, val_ds, batch_size, d.workers, device, amp_dtype)
    res = knn_classify(F.normalize(train_f, dim=1), train_y, F.normalize(val_f, dim=1), val_y,
                       list(ks or dino.knn_k), dino.knn_temperature, len(classes))
    return res, classes
