"""Supervised image classification: the task of every seed recipe but DINO.

A step: the batch (uint8 from the loader, normalised on the device) → mixup / cutmix
(augment/mix.py) → forward under autocast → cross-entropy (soft targets when mixed) → GradStep
(scale, backward, clip, step) → EMA. Evaluation: loss, top-1 and top-5 on the validation split,
of the EMA weights when there are some. ``model.bn_group``: BatchNorm over the reference's images
per device, the loaders putting reference rank i's images in group i (``reference_ranks``)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn as nn

from visionzoo import distributed
from visionzoo.config import RecipeConfig, absolute_data_path, peak_lr, to_dict
from visionzoo.data.augment.mix import PerSampleMixup
from visionzoo.data.loading.build import build_datasets, build_loaders
from visionzoo.data.loading.samplers import SampleOrder
from visionzoo.engine import lockstep
from visionzoo.engine.evaluation.topk import evaluate
from visionzoo.engine.step import Clipping, GradStep
from visionzoo.engine.tasks.base import Batch, Evaluation, Task, Weights
from visionzoo.errors import UserError
from visionzoo.models import build_model
from visionzoo.models.ghost_bn import (
    bn_group_size,
    group_sizes,
    grouped_layers,
    has_batchnorm,
    set_group_sizes,
    update_stats,
    use_bn_groups,
)
from visionzoo.optim import build_optimizer, clip_parameters, lr_schedule
from visionzoo.runtime import compile_module, weights_dtype


def reference_ranks(cfg: RecipeConfig, world_size: int) -> tuple[int, int]:
    """(k, bn_group) when each of ``world_size`` devices stands for k > 1 of the reference's ranks
    (a step's images per device hold k BatchNorm groups): the training order the loaders then
    follow (data/loading/samplers.py train_indices), so that group (or micro-batch) i holds the
    images reference rank i holds. (1, 0): the plain order."""
    group, sync = cfg.model.bn_group, cfg.model.sync_bn and world_size > 1
    per_step = cfg.data.batch_size_per_device * cfg.train.accum_steps
    if group <= 0 or sync or per_step <= group or per_step % group:
        return 1, 0
    return per_step // group, group


def bn_group_of(cfg: RecipeConfig, net: nn.Module, world_size: int) -> int | None:
    """What a run's results say: the images each BatchNorm statistic of ``net`` is taken over in
    training under ``cfg`` on ``world_size`` devices; None without BatchNorm."""
    if not has_batchnorm(net):
        return None
    return bn_group_size(cfg.model.bn_group, cfg.data.batch_size_per_device, world_size, cfg.model.sync_bn)


def check_bn_group(cfg: RecipeConfig, world_size: int) -> None:
    """model.bn_group must divide the per-device micro-batch it splits (a smaller last group
    would be normalised over other images than the reference's ranks see, and a last group of
    one image cannot be normalised at all)."""
    group, micro = cfg.model.bn_group, cfg.data.batch_size_per_device
    if group <= 0 or (cfg.model.sync_bn and world_size > 1) or micro <= group or micro % group == 0:
        return
    raise UserError(f"model.bn_group={group} does not divide the batch per device and micro-step ({micro} = "
                    f"data.batch_size {cfg.data.batch_size} / {world_size} device(s) / train.accum_steps "
                    f"{cfg.train.accum_steps}): its last group would hold {micro % group} image(s); choose a "
                    f"data.batch_size whose share per device is a multiple of {group}")


def build_criterion(cfg: RecipeConfig, num_classes: int) -> tuple[nn.Module, Any]:
    """Loss and mixup/cutmix: soft-target cross-entropy when images are mixed (the label
    smoothing then lives in the mixed targets), plain cross-entropy otherwise."""
    t = cfg.train
    if t.mixup > 0 or t.cutmix > 0:
        from timm.loss import SoftTargetCrossEntropy

        kw = dict(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, prob=t.mixup_prob, switch_prob=t.mixup_switch_prob,
                  label_smoothing=t.label_smoothing, num_classes=num_classes)
        if t.mixup_mode == "elem":  # per-sample lambda, method and box, in a few batched ops
            return SoftTargetCrossEntropy(), PerSampleMixup(**kw)
        from timm.data import Mixup

        return SoftTargetCrossEntropy(), Mixup(mode="batch", **kw)
    return nn.CrossEntropyLoss(label_smoothing=t.label_smoothing), None


def build_network(cfg: RecipeConfig, num_classes: int, device: torch.device, memory_format: torch.memory_format,
                  ddp: bool) -> tuple[nn.Module, dict]:
    """The recipe's network on ``device`` with its BatchNorm as the recipe asks (SyncBatchNorm
    over the ranks, or groups of model.bn_group images), and its constructor arguments."""
    net, model_args = build_model(cfg.model, num_classes, cfg.data.in_chans)
    net = net.to(device, weights_dtype(cfg.train.amp), memory_format=memory_format)
    if cfg.model.sync_bn and ddp:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    elif cfg.model.bn_group > 0:  # BatchNorm over the reference's images per device, on any device count
        use_bn_groups(net, cfg.model.bn_group)
    return net, model_args


def wrap_model(net: nn.Module, device: torch.device, ddp: bool, compile: bool,
               broadcast_buffers: bool = True) -> nn.Module:
    """What the training step calls: ``net`` in DistributedDataParallel (more than one rank;
    ``broadcast_buffers``: rank 0's BatchNorm statistics go to every rank before each forward)
    and ``torch.compile`` (``compile``)."""
    model: nn.Module = net
    if ddp:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                    **distributed.buffer_sync(broadcast_buffers))
    return compile_module(model, device) if compile else model


class ClassifyTask(Task):
    """Supervised classification (``task: supervised``)."""

    name = "supervised"

    @classmethod
    def check(cls, cfg: RecipeConfig, world_size: int, device_type: str) -> None:
        if cfg.model.sync_bn and world_size > 1 and device_type == "cpu":
            raise UserError("model.sync_bn=true needs an accelerator (PyTorch's SyncBatchNorm has no CPU kernel)")
        check_bn_group(cfg, world_size)
        if (cfg.train.mixup > 0 or cfg.train.cutmix > 0) and cfg.data.batch_size_per_device % 2:
            raise UserError(f"mixup/cutmix pair the images of a batch: the batch per device "
                            f"({cfg.data.batch_size_per_device}) must be even")

    def setup_data(self, splits: Any = None) -> None:
        cfg, env = self.cfg, self.env
        splits = splits or build_datasets(cfg.data, train=True)
        self.classes = list(splits.classes)
        cfg.data.num_classes = len(self.classes)  # recorded as built (config.yaml, checkpoints, exports)
        cfg.data.path = absolute_data_path(cfg.data.path)  # eval/export/infer of the run work from any folder
        self._warn_empty_classes(getattr(splits.train, "empty_classes", []))
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        order = SampleOrder(cfg.train.seed, env.rank, env.world_size, reference_ranks(cfg, env.world_size))
        self.train_loader, self.val_loader = build_loaders(splits, cfg.data, cfg.data.batch_size_per_device,
                                                           env.device, order, self.memory_format)
        self.n_train, self.n_val = len(splits.train), len(splits.val)
        self.steps_per_epoch = len(self.train_loader) // cfg.train.accum_steps
        if cfg.train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.max_steps_per_epoch)
        if self.steps_per_epoch < 1:
            raise UserError(f"the training split ({self.n_train} images) is smaller than one global "
                            f"batch ({cfg.data.batch_size}); lower data.batch_size")

    def build(self) -> None:
        """The recipe's network, then what trains it (``attach``)."""
        fmt = torch.channels_last if self.cfg.model.channels_last else torch.contiguous_format
        self.attach(*build_network(self.cfg, len(self.classes), self.env.device, fmt, self.env.ddp))

    def attach(self, net: nn.Module, model_args: dict) -> None:
        """Train ``net`` (the recipe's, or one a test or benchmark built): the recipe's optimizer,
        LR schedule, GradStep, loss, mixup and EMA for it."""
        cfg, env, num_classes = self.cfg, self.env, len(self.classes)
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.net, self.model_args = net, model_args
        self.model: nn.Module = self.net  # what is called: DDP- and compile-wrapped by ``wrap``
        self.optimizer = build_optimizer(self.net, cfg.optim, env.device.type)
        self.lrs = lr_schedule(cfg.schedule, peak_lr(cfg), cfg.train.epochs, max(self.steps_per_epoch, 1))
        clipping = Clipping(cfg.optim.clip_mode, cfg.optim.clip_value, clip_parameters(self.net, cfg.optim))
        self.step = GradStep(self.optimizer, env.device, env.amp_dtype, cfg.train.loss_scale, cfg.train.init_scale,
                             clipping)
        self.criterion, self.mixup = build_criterion(cfg, num_classes)
        self.ema, self._ema_loaded = None, False
        if cfg.train.ema_decay > 0:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.net, decay=cfg.train.ema_decay)
        self.grouped = grouped_layers(self.net)  # model.bn_group's layers
        self.grouped_bn = self.grouped if cfg.train.accum_steps > 1 else []  # micro-batches: stats from the first
        self.input_dtype = weights_dtype(cfg.train.amp)  # float64 with train.amp=fp64
        self.sample_shape = (cfg.data.in_chans, cfg.data.image_size, cfg.data.image_size)
        self.meta = {"config": to_dict(cfg), "model": self.model_args, "classes": self.classes}
        self._step_index = 0

    def _warn_empty_classes(self, empty: list[str]) -> None:
        if empty and self.env.is_main:  # they keep their label index; the model can never predict them well
            print(f"warning: {len(empty)} class folder(s) with no training images: {', '.join(empty[:5])}"
                  + (" ..." if len(empty) > 5 else ""), flush=True)

    def wrap(self, resumed: bool) -> None:
        cfg, env = self.cfg, self.env
        self.model = wrap_model(self.net, env.device, env.ddp, cfg.train.compile, cfg.model.bn_broadcast)
        if self.ema is not None and not self._ema_loaded:
            self.ema.module.load_state_dict(self.net.state_dict())  # DDP gave every rank rank 0's weights

    # --- a step --------------------------------------------------------------------------------
    def train(self) -> None:
        self.model.train()

    def prepare(self, item: Any) -> Batch:
        images, targets, n_bad = item
        kept = len(images) if images.numel() else 0
        # Mixing pairs sample i with sample B-1-i: a batch that lost an unreadable image drops one more.
        trim = int(self.mixup is not None and kept % 2 == 1)
        if trim:
            images, targets = images[:-1], targets[:-1]
        if self.grouped:
            self._align_groups(kept, n_bad, trim)
        n = kept - trim
        if n:
            images = images.to(self.env.device, self.input_dtype, non_blocking=True, memory_format=self.memory_format)
            targets = targets.to(self.env.device, non_blocking=True)
            self.sample_shape = tuple(images.shape[1:])
        return Batch(n, n_bad, (images, targets))

    def _align_groups(self, kept: int, n_bad: Any, trim: int) -> None:
        """Group sizes for a batch that lost images: each BatchNorm group keeps the rest of its
        reference rank's images (collate names the dropped positions), instead of every later
        group shifting; None (``bn_group`` each) for a whole batch."""
        group = self.grouped[0].group  # model.bn_group, or what a caller set with use_bn_groups
        if not n_bad and not trim and kept % group != 1:
            set_group_sizes(self.grouped, None)
            return
        positions = getattr(n_bad, "positions", None)
        if positions is not None:
            sizes = group_sizes(kept + len(positions), group, positions)
        else:  # places not known (a shard stream): what is left, split from the start
            sizes = group_sizes(kept, group)
        if trim:  # mixup's extra drop comes off the end
            sizes[-1] -= 1
            if sizes[-1] == 0:
                sizes.pop()
            elif sizes[-1] == 1 and len(sizes) > 1:
                sizes[-2] += sizes.pop()
        set_group_sizes(self.grouped, sizes or None)

    def set_step(self, global_step: int, epoch: int) -> dict[str, float]:
        self._step_index = global_step
        lr = float(self.lrs[min(global_step, len(self.lrs) - 1)])  # no NumPy scalars in the optimizer state
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return {"lr": lr}

    def accumulate(self, update: bool) -> AbstractContextManager:
        return self.model.no_sync() if not update and hasattr(self.model, "no_sync") else nullcontext()

    def loss(self, batch: Batch, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, hard_targets = batch.data
        targets = hard_targets
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        if self.grouped_bn:  # running statistics from the step's first micro-batch, as the reference's rank 0
            update_stats(self.grouped_bn, micro == 0)
        with self.env.autocast():
            logits = self.model(images)
        # The loss of float32 logits, on every device: CUDA's autocast computes (log-)softmax in
        # float32 by itself, the CPU's runs log_softmax in bf16 (the soft targets of mixup/cutmix).
        loss = self.criterion(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets)  # fp64 stays
        return loss, (logits.detach().argmax(1) == hard_targets).sum()

    def placeholder_loss(self) -> torch.Tensor:
        x = lockstep.placeholder(self.sample_shape, self.env.device, self.memory_format,
                                 lockstep.placeholder_rows(self.net), self.input_dtype)
        with self.env.autocast():
            return lockstep.zero_weight_loss(self.model, self.net, x)

    def after_update(self, batch: Batch) -> None:
        if self.ema is not None:
            self.ema.update(self.net, step=self._step_index)

    # --- epochs, evaluation, state ---------------------------------------------------------------
    def end_epoch(self) -> None:
        # model.bn_average: every rank then evaluates and saves the same BatchNorm statistics
        # (timm); otherwise each keeps its own and rank 0's are saved, as torchvision's and mmcls's.
        if self.cfg.model.bn_average:
            distributed.average_bn_stats(self.net, self.ema.module if self.ema is not None else None)

    def evaluate(self) -> Evaluation:
        # The bare module (or the EMA): ranks evaluate unequal shards, and DDP's forward may communicate.
        model = self.ema.module if self.ema is not None else (self.net if self.env.ddp else self.model)
        res = evaluate(model, self.val_loader, self.env.device, self.env.amp_dtype, self.cfg.model.channels_last,
                       reduce=distributed.all_reduce_sum if self.env.ddp else None,
                       progress=self.cfg.log.progress if self.env.is_main else "off")
        return Evaluation(res["acc1"], res["acc5"], {"val_loss": res["loss"]}, res["bad_images"], res["bad_names"])

    def describe_eval(self, record: dict) -> str:
        k = min(5, len(self.classes))  # top-5 is top-k with fewer classes: named for what it is
        return f"val loss {record['val_loss']:.4f} Acc@1 {record['acc1']:.2f}% Acc@{k} {record['acc5']:.2f}%"

    def weights(self) -> Weights:
        return Weights(self.net, self.meta, self.ema.module if self.ema is not None else None)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "grad_step": self.step.state_dict()}

    def load_state_dict(self, state: dict, weights: dict[str, torch.Tensor]) -> None:
        own = state  # what state_dict() returned
        self.net.load_state_dict(weights)
        self.optimizer.load_state_dict(own["optimizer"])
        self.step.load_state_dict(own["grad_step"])
        if self.ema is not None and "ema_weights" in state:
            self.ema.module.load_state_dict(state["ema_weights"])
            self._ema_loaded = True

    def header(self) -> tuple[str, str]:
        a = self.model_args
        group = bn_group_of(self.cfg, self.net, self.env.world_size)
        grouped = f" ({len(self.grouped)} layers grouped)" if self.grouped and self.cfg.model.bn_group else ""
        return (f"{a['library']} {a['name']} | {self.n_train} train / {self.n_val} val images, "
                f"{len(self.classes)} classes",
                f"batch {self.cfg.data.batch_size}" + (f", BatchNorm over {group}{grouped}" if group else ""))

    def results(self, last_eval: Evaluation | None) -> dict:
        return {"BN group": bn_group_of(self.cfg, self.net, self.env.world_size),  # images per BN statistic
                "BN layers grouped": len(self.grouped),  # model.bn_group: the layers it applies to
                # what Acc@1 measured, and model.safetensors holds: the EMA when there is one
                "weights": f"ema (train.ema_decay={self.cfg.train.ema_decay})" if self.ema is not None else "trained"}

    def in_sync(self) -> bool:
        # DDP keeps replicas equal (BatchNorm statistics too where averaged); checked, with the EMA
        return distributed.params_in_sync(self.net, self.ema.module if self.ema is not None else None,
                                          buffers=self.cfg.model.bn_average)

    def loaders(self) -> list:
        return [self.train_loader, self.val_loader]
