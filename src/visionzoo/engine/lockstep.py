"""Every rank takes every global step, also when its own batch holds no usable image.

A shard that breaks off is filled with placeholder samples so that every rank draws the same
number of batches; a batch made only of placeholders (or of unreadable files) is then empty on
that rank alone. Skipping it there would pair different steps across ranks in DDP's gradient
all-reduce (mixed-up gradients) and leave a later collective without a partner (a hang until
``train.dist_timeout``). Such a rank instead runs a zero-weight step: a forward and backward on a
placeholder input whose loss is multiplied by zero, so it joins the all-reduce with zero
gradients and its optimizer, schedule and step counter advance with the others.

The placeholder forward must leave the network's state as the other ranks leave theirs and join
every collective they join:

- plain BatchNorm (and dropout) would learn from, or draw for, the zeros in training mode, so the
  network runs in eval mode on two placeholder rows; its batch counters are advanced by hand;
- SyncBatchNorm communicates in training mode only (an all-gather of statistics, an all-reduce
  in backward): a network holding one runs in training mode on a placeholder of zero rows, which
  SyncBatchNorm counts as no images (its statistics come from the other ranks alone, and its
  running statistics move exactly as theirs).

With one process nothing has to be matched: an empty batch is skipped, as before."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from visionzoo import distributed

PLACEHOLDER_ROWS = 2  # BatchNorm in train mode refuses a batch of one; eval mode is used anyway


def must_step_empty() -> bool:
    """Whether an empty local batch still takes a (zero-weight) step: on several ranks."""
    return distributed.world_size() > 1


def has_sync_bn(net: nn.Module) -> bool:
    """Whether ``net`` communicates in its training-mode forward (SyncBatchNorm)."""
    return any(isinstance(m, nn.SyncBatchNorm) for m in net.modules())


def placeholder(shape: Sequence[int], device: torch.device,
                memory_format: torch.memory_format = torch.contiguous_format, rows: int = PLACEHOLDER_ROWS,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """Zeros of ``rows`` samples of ``shape`` (C, H, W)."""
    x = torch.zeros((rows, *shape), device=device, dtype=dtype)
    return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x


def placeholder_rows(net: nn.Module) -> int:
    """Rows of the placeholder input for ``net`` (see the module docstring)."""
    return 0 if has_sync_bn(net) else PLACEHOLDER_ROWS


def placeholder_forward(model: nn.Module, net: nn.Module, inputs: Any) -> Any:
    """``model(inputs)`` (``net``: the bare module inside it) on a placeholder, leaving every
    running statistic and random stream as the other ranks leave theirs: eval mode with the
    BatchNorm batch counters advanced, or, for a network with SyncBatchNorm (inputs of zero rows),
    training mode, so that its collectives pair with the other ranks'."""
    if has_sync_bn(net):
        return model(inputs)
    was_training = net.training
    net.eval()
    try:
        out = model(inputs)
    finally:
        net.train(was_training)
    if was_training:  # the batch counters advance as on the other ranks, so all buffers stay equal
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_batches_tracked is not None:
                m.num_batches_tracked.add_(1)
    return out


def zero_weight_loss(model: nn.Module, net: nn.Module, inputs: Any) -> torch.Tensor:
    """A loss of exactly zero that still runs ``model``'s forward and backward on ``inputs``
    (a placeholder): DDP's hooks fire and every parameter gets a zero gradient."""
    out = placeholder_forward(model, net, inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return sum(o.float().sum() for o in outs) * 0.0
