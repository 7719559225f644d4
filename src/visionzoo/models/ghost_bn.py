"""BatchNorm over the reference's group of images on any number of devices ("ghost" BatchNorm).

A reference trained on N devices with plain BatchNorm normalises each device's batch on its own:
statistics over, e.g., 16 images (mmcls resnet50_8xb16_cifar100) or 128 (torchvision's DenseNet
recipe at 8 x 128). On fewer devices, the same global batch puts more images on each device, and
plain BatchNorm would take its statistics over all of them: a different function with different
gradients. ``GroupedBatchNorm*`` splits the per-device batch into consecutive groups of
``group`` images and normalises each group on its own, in one forward, so one device computes
what the reference's ranks compute:

- outputs: group i is normalised by the same BatchNorm kernel, on the same [group, C, ...] slice,
  as reference rank i normalises its batch (the loaders put rank i's images in group i:
  engine/tasks/classify.py ``reference_ranks``, data/loading/samplers.py train_indices);
- gradients: the reference averages the ranks' gradients (DDP); here the loss over the whole
  batch has the same gradient, up to floating-point summation order;
- running statistics: only the first group updates them, as only rank 0's are kept by the
  references (saved by rank 0; broadcast to the others by DDP where it broadcasts buffers).

In eval mode, or when the batch holds at most one group, this is nn.BatchNorm*. The state dict
keys are BatchNorm's: checkpoints load into plain BatchNorm (eval, export) unchanged.
Bit-identical to the reference instead: micro-batches of one group each (train.accum_steps).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d

from visionzoo.errors import UserError


class _Grouped:
    """Mixin over a BatchNorm class: ``group`` images per normalisation group (0: the whole
    batch); ``update_stats`` False: this forward leaves the running statistics alone; ``sizes``:
    this forward's group sizes when a batch lost images (``group_sizes``), else None."""

    group: int = 0
    update_stats: bool = True
    sizes: list[int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        if self.sizes is not None and sum(self.sizes) == x.shape[0]:
            first, *rest = x.split(self.sizes)
        else:
            g = self.group
            first, *rest = x.split(g) if 0 < g < x.shape[0] else (x,)
        # The first group goes through BatchNorm itself: it alone updates the running statistics.
        out = [self._with_stats(first) if self.update_stats else self._normalise(first)]
        out += [self._normalise(chunk) for chunk in rest]
        return self._after(out[0] if len(out) == 1 else torch.cat(out))

    def _with_stats(self, x: torch.Tensor) -> torch.Tensor:
        """The class's own training-mode BatchNorm (it updates the running statistics)."""
        return super().forward(x)

    def _after(self, x: torch.Tensor) -> torch.Tensor:
        """What the class applies after normalising (timm's BatchNormAct2d: dropout, activation)."""
        return x

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Training-mode BatchNorm of ``x`` that reads and writes no running statistics."""
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group}"


class GroupedBatchNorm1d(_Grouped, nn.BatchNorm1d):
    """nn.BatchNorm1d with statistics per group of ``group`` samples (see the module docstring)."""


class GroupedBatchNorm2d(_Grouped, nn.BatchNorm2d):
    """nn.BatchNorm2d with statistics per group of ``group`` images (see the module docstring)."""


class GroupedBatchNorm3d(_Grouped, nn.BatchNorm3d):
    """nn.BatchNorm3d with statistics per group of ``group`` samples (see the module docstring)."""


class GroupedBatchNormAct2d(_Grouped, BatchNormAct2d):
    """timm's BatchNormAct2d (BatchNorm, then dropout and activation in one module: densenet,
    efficientnet, ...) with statistics per group of ``group`` images."""

    def _with_stats(self, x: torch.Tensor) -> torch.Tensor:
        return nn.BatchNorm2d.forward(self, x)  # the normalisation alone; the activation follows once

    def _after(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


_GROUPED = {nn.BatchNorm1d: GroupedBatchNorm1d, nn.BatchNorm2d: GroupedBatchNorm2d, nn.BatchNorm3d: GroupedBatchNorm3d,
            BatchNormAct2d: GroupedBatchNormAct2d}


def grouped_layers(net: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``net`` that ``use_bn_groups`` made grouped."""
    return [m for m in net.modules() if isinstance(m, _Grouped)]


def update_stats(layers: list[nn.Module], on: bool) -> None:
    """Let the next forwards of ``layers`` update their running statistics or not. With
    micro-batches (train.accum_steps), only the first of each optimizer step does: the
    reference's rank 0 updates them once per step, from its own batch."""
    for m in layers:
        m.update_stats = on


def has_batchnorm(net: nn.Module) -> bool:
    """Whether ``net`` holds a BatchNorm layer (of any kind, SyncBatchNorm included)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def use_bn_groups(net: nn.Module, group: int) -> int:
    """Make every BatchNorm of ``net`` normalise groups of ``group`` images, in place (the modules
    keep their parameters, buffers and device): BatchNorm1d/2d/3d and timm's BatchNormAct2d.
    Returns how many were changed; a BatchNorm of another kind is a UserError (grouping it
    silently would leave the run's statistics other than it says)."""
    changed, other = 0, set()
    for m in net.modules():
        grouped = _GROUPED.get(type(m))
        if grouped is not None or isinstance(m, _Grouped):
            if grouped is not None:
                m.__class__ = grouped  # same attributes and state; only forward differs
            m.group = int(group)
            changed += 1
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            other.add(type(m).__name__)
    if other:
        raise UserError(f"model.bn_group={group}: the network's {', '.join(sorted(other))} layers cannot be "
                        "grouped (visionzoo groups BatchNorm1d/2d/3d and timm's BatchNormAct2d); set "
                        "model.bn_group=0 for plain BatchNorm")
    return changed


def set_group_sizes(layers: list[nn.Module], sizes: list[int] | None) -> None:
    """The group sizes of the next forwards of ``layers`` (None: ``group`` images each)."""
    for m in layers:
        m.sizes = sizes


def group_sizes(total: int, group: int, dropped: Sequence[int] = ()) -> list[int]:
    """The BatchNorm groups of a batch that held ``total`` images before the ones at positions
    ``dropped`` were dropped (unreadable): each group keeps the rest of its reference rank's
    images, so the groups after a drop stay aligned; an emptied group disappears, and a group
    left with one image joins the one before it (BatchNorm cannot normalise one value per
    channel). Where the places are not known, pass the images left as ``total``."""
    counts = [min(group, total - start) for start in range(0, total, group)]
    for p in dropped:
        counts[p // group] -= 1
    sizes: list[int] = []
    for c in (c for c in counts if c > 0):
        if c == 1 and sizes:
            sizes[-1] += 1
        else:
            sizes.append(c)
    if len(sizes) > 1 and sizes[0] == 1:
        sizes[0:2] = [sizes[0] + sizes[1]]
    return sizes


def bn_group_size(bn_group: int, micro_batch: int, world_size: int, sync_bn: bool) -> int:
    """Images each BatchNorm statistic is taken over in training: ``bn_group`` (the reference's
    images per device) when the per-device micro-batch holds more, else the micro-batch; with
    SyncBatchNorm, the micro-batches of all devices together."""
    if sync_bn and world_size > 1:
        return micro_batch * world_size
    return min(bn_group, micro_batch) if bn_group > 0 else micro_batch
