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

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Grouped:
    """Mixin over a BatchNorm class: ``group`` images per normalisation group (0: the whole
    batch); ``update_stats`` False: this forward leaves the running statistics alone."""

    group: int = 0
    update_stats: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        g = self.group
        first, *rest = x.split(g) if 0 < g < x.shape[0] else (x,)
        # The first group goes through BatchNorm itself: it alone updates the running statistics.
        out = [super().forward(first) if self.update_stats else self._normalise(first)]
        out += [self._normalise(chunk) for chunk in rest]
        return out[0] if len(out) == 1 else torch.cat(out)

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


_GROUPED = {nn.BatchNorm1d: GroupedBatchNorm1d, nn.BatchNorm2d: GroupedBatchNorm2d, nn.BatchNorm3d: GroupedBatchNorm3d}


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
    """Make every plain BatchNorm1d/2d/3d of ``net`` normalise groups of ``group`` images, in
    place (the modules keep their parameters, buffers and device). Returns how many were changed;
    subclasses with their own forward (SyncBatchNorm, timm's BatchNormAct2d) are left alone."""
    changed = 0
    for m in net.modules():
        grouped = _GROUPED.get(type(m))
        if grouped is not None or isinstance(m, _Grouped):
            if grouped is not None:
                m.__class__ = grouped  # same attributes and state; only forward differs
            m.group = int(group)
            changed += 1
    return changed


def bn_group_size(bn_group: int, micro_batch: int, world_size: int, sync_bn: bool) -> int:
    """Images each BatchNorm statistic is taken over in training: ``bn_group`` (the reference's
    images per device) when the per-device micro-batch holds more, else the micro-batch; with
    SyncBatchNorm, the micro-batches of all devices together."""
    if sync_bn and world_size > 1:
        return micro_batch * world_size
    return min(bn_group, micro_batch) if bn_group > 0 else micro_batch
