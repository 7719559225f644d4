"""What a supervised run is built of: the network, optimizer, per-step LR, loss scaler, loss,
mixup and EMA of a recipe (``build_training``, shared with ``visionzoo bench``), the DDP /
torch.compile wrapper, and the epoch hand-over to either kind of loader."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from visionzoo import distributed
from visionzoo.config import RecipeConfig
from visionzoo.data.augment.mix import PerSampleMixup
from visionzoo.engine.step import GradStep
from visionzoo.errors import UserError
from visionzoo.models import build_model
from visionzoo.models.ghost_bn import use_bn_groups
from visionzoo.optim import build_optimizer, clip_parameters, lr_schedule
from visionzoo.runtime import (
    weights_dtype,
)


def build_criterion(cfg: RecipeConfig, num_classes: int) -> tuple[nn.Module, Any]:
    """Loss and mixup/cutmix: soft-target cross-entropy when images are mixed (the label
    smoothing then lives in the mixed targets), plain cross-entropy otherwise."""
    t = cfg.train
    if t.mixup > 0 or t.cutmix > 0:
        from timm.loss import SoftTargetCrossEntropy

        if cfg.data.batch_size_per_device % 2:
            raise UserError(f"mixup/cutmix pair the images of a batch: the batch per device "
                            f"({cfg.data.batch_size_per_device}) must be even")
        kw = dict(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, prob=t.mixup_prob, switch_prob=t.mixup_switch_prob,
                  label_smoothing=t.label_smoothing, num_classes=num_classes)
        if t.mixup_mode == "elem":  # per-sample lambda, method and box, in a few batched ops
            return SoftTargetCrossEntropy(), PerSampleMixup(**kw)
        from timm.data import Mixup

        return SoftTargetCrossEntropy(), Mixup(mode="batch", **kw)
    return nn.CrossEntropyLoss(label_smoothing=t.label_smoothing), None


def build_training(cfg: RecipeConfig, num_classes: int, device: torch.device, amp_dtype: torch.dtype | None,
                   memory_format: torch.memory_format, steps_per_epoch: int, ddp: bool) -> tuple:
    """The recipe's network (on ``device``), optimizer, per-step LR schedule, GradStep, loss,
    mixup and EMA, as training and ``visionzoo bench`` both use them. Returns
    ``(net, model_args, optimizer, lrs, stepper, criterion, mixup, ema)``."""
    net, model_args = build_model(cfg.model, num_classes, cfg.data.in_chans)
    net = net.to(device, weights_dtype(cfg.train.amp), memory_format=memory_format)
    if cfg.model.sync_bn and ddp:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    elif cfg.model.bn_group > 0:  # BatchNorm over the reference's images per device, on any device count
        use_bn_groups(net, cfg.model.bn_group)
    optimizer = build_optimizer(net, cfg.optim, device.type)
    lrs = lr_schedule(cfg.schedule, cfg.optim.lr, cfg.train.epochs, steps_per_epoch)
    stepper = GradStep(optimizer, device, amp_dtype, cfg.train.loss_scale, cfg.train.init_scale,
                       cfg.optim.clip_mode, cfg.optim.clip_value, clip_parameters(net, cfg.optim))
    criterion, mixup = build_criterion(cfg, num_classes)
    ema = None
    if cfg.train.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(net, decay=cfg.train.ema_decay)
    return net, model_args, optimizer, lrs, stepper, criterion, mixup, ema


def wrap_model(net: nn.Module, device: torch.device, ddp: bool, compile: bool, broadcast_buffers: bool = True) -> nn.Module:
    """What the training step calls: ``net`` in DistributedDataParallel (more than one rank;
    ``broadcast_buffers``: rank 0's BatchNorm statistics go to every rank before each forward)
    and ``torch.compile`` (``compile``)."""
    model: nn.Module = net
    if ddp:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                    **distributed.buffer_sync(broadcast_buffers))
    return torch.compile(model) if compile else model


def set_loader_epoch(loader, epoch: int, skip_batches: int) -> None:
    """Select an epoch's sample order in either kind of loader, skipping batches already trained on."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch, skip_batches)
    else:
        loader.sampler.set_epoch(epoch, skip_batches * loader.batch_size)
