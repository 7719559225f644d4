"""Every rank takes every global step, also when its own batch holds no usable image.

A shard that breaks off is filled with placeholder samples so that every rank draws the same
number of batches; a batch made only of placeholders (or of unreadable files) is then empty on
that rank alone. Skipping it there would pair different steps across ranks in DDP's gradient
all-reduce (mixed-up gradients) and leave a later collective without a partner (a hang until
``train.dist_timeout``). Such a rank instead runs a zero-weight step: a forward and backward on a
small placeholder input whose loss is multiplied by zero, so it joins the all-reduce with zero
gradients and its optimizer, schedule and step counter advance with the others. The placeholder
forward runs with the network in eval mode, so BatchNorm's running statistics do not see it
(its batch counter still advances, as on the ranks with images).

With one process nothing has to be matched: an empty batch is skipped, as before."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from visionzoo import distributed

PLACEHOLDER_ROWS = 2  # BatchNorm in train mode refuses a batch of one; eval mode is used anyway


def must_step_empty() -> bool:
    """Whether an empty local batch still takes a (zero-weight) step: on several ranks."""
    return distributed.world_size() > 1


def placeholder(shape: Sequence[int], device: torch.device,
                memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Zeros of ``PLACEHOLDER_ROWS`` samples of ``shape`` (C, H, W)."""
    x = torch.zeros((PLACEHOLDER_ROWS, *shape), device=device)
    return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x


def zero_weight_loss(model: nn.Module, net: nn.Module, inputs) -> torch.Tensor:
    """A loss of exactly zero that still runs ``model``'s forward and backward on ``inputs``
    (a placeholder): DDP's hooks fire and every parameter gets a zero gradient. ``net`` (the
    bare module) is in eval mode meanwhile, so no running statistic or dropout draw is touched."""
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
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return sum(o.float().sum() for o in outs) * 0.0
