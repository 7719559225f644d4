"""Supervised training: the one loop every supervised recipe runs.

``fit`` builds data, model and optimizer from a resolved config, then alternates
``train_one_epoch`` and ``evaluate``; a ``--perf`` run instead times a fixed number of steps.
A batch goes: loader (data/build.py) → device → mixup/cutmix → autocast forward → loss →
GradStep (scale, backward, clip, step) → EMA."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from visionzoo import distributed
from visionzoo.checkpoint import BEST, STATE, WEIGHTS, save_state, save_weights
from visionzoo.config import RecipeConfig, for_world_size, to_dict, to_yaml
from visionzoo.data.build import build_datasets, build_loaders
from visionzoo.engine.evaluate import evaluate
from visionzoo.engine.step import GradStep
from visionzoo.errors import UserError
from visionzoo.models import build_model
from visionzoo.optim import build_optimizer, clip_parameters, lr_schedule
from visionzoo.progress import Progress
from visionzoo.plots import plot_curves
from visionzoo.report import MetricsLog, mark_status, new_run_dir, write_results
from visionzoo.runtime import precision_name, resolve_amp, resolve_device, seed_everything, synchronize


@dataclass
class Loop:
    """What the training step needs, built once by ``fit``."""

    model: nn.Module  # what is called: possibly DDP- and compile-wrapped
    net: nn.Module  # the bare module, whose state dict is saved
    optimizer: torch.optim.Optimizer
    step: GradStep
    lrs: np.ndarray  # LR for every optimizer step of the run
    criterion: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    accum_steps: int = 1
    mixup: Any = None
    ema: Any = None
    log: MetricsLog | None = None  # rank 0 only
    log_every: int = 50
    progress: str = "auto"  # auto | bar | lines | off
    global_step: int = 0  # optimizer steps taken
    bad_images: int = 0
    last_loss: float = float("nan")


@dataclass
class EpochStats:
    loss: float = float("nan")
    acc1: float = float("nan")  # on the training batches (hard labels, before mixing)
    steps: int = 0
    images: int = 0
    timed_images: int = 0
    timed_seconds: float = 0.0
    step_times: list[float] = field(default_factory=list)

    @property
    def img_per_s(self) -> float:
        return self.timed_images / self.timed_seconds if self.timed_seconds > 0 else float("nan")


def train_one_epoch(loop: Loop, loader, epoch: int, max_steps: int = 0, time_after: int = 0) -> EpochStats:
    """Train over ``loader`` (at most ``max_steps`` optimizer steps when > 0). Throughput is
    timed from optimizer step ``time_after`` on, so warm-up (cuDNN autotuning, compilation,
    worker start-up) is left out."""
    loop.model.train()
    stats = EpochStats()
    sums = torch.zeros(3, dtype=torch.float64, device=loop.device)  # loss×n, correct, n
    autocast = torch.autocast(loop.device.type, dtype=loop.amp_dtype) if loop.amp_dtype else nullcontext()
    t_start = None if time_after > 0 else time.perf_counter()
    micro = 0
    total = min(len(loader) // loop.accum_steps, max_steps) if max_steps else len(loader) // loop.accum_steps
    progress = Progress(loader, total * loop.accum_steps, f"epoch {epoch + 1}", loop.progress,
                        enabled=loop.log is not None)
    for images, targets, n_bad in progress:
        loop.bad_images += n_bad
        if images.numel() == 0:
            continue
        images = images.to(loop.device, non_blocking=True, memory_format=loop.memory_format)
        targets = targets.to(loop.device, non_blocking=True)
        update = (micro + 1) % loop.accum_steps == 0
        if update:
            for group in loop.optimizer.param_groups:
                group["lr"] = loop.lrs[min(loop.global_step, len(loop.lrs) - 1)]
        hard_targets = targets
        if loop.mixup is not None:
            images, targets = loop.mixup(images, targets)
        no_sync = loop.model.no_sync if (not update and hasattr(loop.model, "no_sync")) else nullcontext
        with no_sync(), autocast:
            logits = loop.model(images)
            loss = loop.criterion(logits, targets)
        loop.step(loss / loop.accum_steps, update=update)
        micro += 1
        n = len(hard_targets)
        sums += torch.stack([
            loss.detach().double() * n,
            (logits.detach().argmax(1) == hard_targets).sum().double(),
            torch.tensor(n, dtype=torch.float64, device=loop.device),
        ])
        stats.images += n
        if t_start is not None:
            stats.timed_images += n
        if not update:
            continue
        if loop.ema is not None:
            loop.ema.update(loop.net, step=loop.global_step)
        loop.global_step += 1
        stats.steps += 1
        if stats.steps == time_after:
            synchronize(loop.device)
            t_start = time.perf_counter()
        if loop.log is not None and loop.log_every > 0 and loop.global_step % loop.log_every == 0:
            loop.last_loss = float(loss.item())  # a sync, only at log points
            elapsed = time.perf_counter() - t_start if t_start else 0.0
            img_s = stats.timed_images / elapsed if elapsed > 0 else None
            lr = float(loop.optimizer.param_groups[0]["lr"])
            loop.log.write(kind="step", epoch=epoch + 1, step=loop.global_step, loss=loop.last_loss, lr=lr, img_s=img_s)
            progress.update(loss=loop.last_loss, lr=lr, **{"img/s": img_s})
        if max_steps and stats.steps >= max_steps:
            break
    progress.close()
    synchronize(loop.device)
    if t_start is not None:
        stats.timed_seconds = time.perf_counter() - t_start
    sums = distributed.all_reduce_sum(sums)
    loss_sum, correct, count = sums.tolist()
    if count > 0:
        stats.loss, stats.acc1 = loss_sum / count, 100.0 * correct / count
        loop.last_loss = stats.loss
    return stats


def _criterion(cfg: RecipeConfig, num_classes: int) -> tuple[nn.Module, Any]:
    """Loss and mixup/cutmix: soft-target cross-entropy when images are mixed (the label
    smoothing then lives in the mixed targets), plain cross-entropy otherwise."""
    t = cfg.train
    if t.mixup > 0 or t.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, switch_prob=t.mixup_switch_prob,
                      mode="batch", label_smoothing=t.label_smoothing, num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    return nn.CrossEntropyLoss(label_smoothing=t.label_smoothing), None


def fit(cfg: RecipeConfig, perf: bool = False) -> dict:
    """Train ``cfg`` (or time it, with ``perf``); write the run folder; return results.json's dict."""
    t0 = time.perf_counter()
    info = distributed.from_env()
    cfg = for_world_size(cfg, info.world_size)
    device = resolve_device(cfg.train.device, info.local_rank)
    if cfg.model.sync_bn and info.enabled and device.type == "cpu":
        raise UserError("model.sync_bn=true needs an accelerator (PyTorch's SyncBatchNorm has no CPU kernel)")
    distributed.init(info, device, cfg.train.dist_timeout)
    seed_everything(cfg.train.seed + info.rank)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic
    amp_dtype = resolve_amp(cfg.train.amp, device)

    splits = build_datasets(cfg.data, train=True)
    num_classes = len(splits.classes)
    batch = cfg.data.batch_size_per_device
    use_cl = cfg.model.channels_last
    memory_format = torch.channels_last if use_cl else torch.contiguous_format
    train_loader, val_loader = build_loaders(splits, cfg.data, batch, device, cfg.train.seed,
                                             info.rank, info.world_size, memory_format)
    steps_per_epoch = len(train_loader) // cfg.train.accum_steps
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise UserError(f"the training split ({len(splits.train)} images) is smaller than one global "
                        f"batch ({cfg.data.batch_size}); lower data.batch_size")

    net, model_args = build_model(cfg.model, num_classes, cfg.data.in_chans)
    net = net.to(device, memory_format=memory_format)
    if cfg.model.sync_bn and info.enabled:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    model: nn.Module = net
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        model = torch.compile(model)

    optimizer = build_optimizer(net, cfg.optim, device.type)
    lrs = lr_schedule(cfg.schedule, cfg.optim.lr, cfg.train.epochs, steps_per_epoch)
    stepper = GradStep(optimizer, device, amp_dtype, cfg.train.loss_scale, cfg.train.init_scale,
                       cfg.optim.clip_mode, cfg.optim.clip_value, clip_parameters(net, cfg.optim))
    criterion, mixup = _criterion(cfg, num_classes)
    ema = None
    if cfg.train.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(net, decay=cfg.train.ema_decay)

    run_dir = log = None
    if info.is_main:
        run_dir = new_run_dir(cfg.recipe, cfg.output)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        log = MetricsLog(run_dir / "metrics.jsonl", run_dir / "tensorboard" if cfg.log.tensorboard else None)
        mark_status(run_dir, "running")
        print(f"visionzoo: {'perf run' if perf else 'training'} {cfg.recipe} | {model_args['library']} "
              f"{model_args['name']} | {len(splits.train)} train / {len(splits.val)} val images, "
              f"{num_classes} classes | {info.world_size} × {device} {precision_name(amp_dtype)} | "
              f"batch {cfg.data.batch_size} | run folder {run_dir}", flush=True)

    loop = Loop(model, net, optimizer, stepper, lrs, criterion, device, amp_dtype, memory_format,
                cfg.train.accum_steps, mixup, ema, log, cfg.train.log_every, cfg.log.progress)
    meta = {"config": to_dict(cfg), "model": model_args, "classes": splits.classes}
    eval_kw = dict(device=device, amp_dtype=amp_dtype, channels_last=use_cl,
                   reduce=distributed.all_reduce_sum if info.enabled else None,
                   progress=cfg.log.progress if info.is_main else "off")

    try:
        timed_images, timed_seconds, epochs_done, last_eval = _run_epochs(
            cfg, perf, loop, train_loader, val_loader, steps_per_epoch, info, eval_kw, run_dir, meta)
    except BaseException as err:
        if info.is_main:
            mark_status(run_dir, "failed", error=f"{type(err).__name__}: {err}"[:500])
            log.close()
        raise
    fps = timed_images / timed_seconds if timed_seconds > 0 else None
    results = {
        "recipe": cfg.recipe,
        "Acc@1": last_eval["acc1"] if last_eval else None,
        "Acc@5": last_eval["acc5"] if last_eval else None,
        "FPS": fps,
        "FPS_per_device": fps / info.world_size if fps else None,
        "devices": info.world_size,
        "epochs": round(epochs_done, 2),
        "precision": precision_name(amp_dtype),
        "torch": torch.__version__.split("+")[0],
        "mode": "perf" if perf else "full",
        "batch_size": cfg.data.batch_size,
        "steps": loop.global_step,
        "ActualFPS": fps,
        "TrainingTime": 1000.0 * cfg.data.batch_size / fps if fps else None,  # ms per optimizer step
        "TrainAccuracy": last_eval["acc1"] if last_eval else None,  # the seeds' name for final val Acc@1
        "ActualLoss": loop.last_loss,
        "E2ETrainingTime": time.perf_counter() - t0,
        "bad_images": loop.bad_images + (last_eval["bad_images"] if last_eval else 0),
        "skipped_steps": stepper.skipped,
        "ranks_in_sync": distributed.params_in_sync(net),  # DDP keeps replicas equal; checked
        "device": str(device),
        "run_dir": str(run_dir) if run_dir else None,
    }
    if info.is_main:
        if perf:
            _save(run_dir, loop, meta, epochs_done, None)
        log.close()
        table = write_results(run_dir, results)
        mark_status(run_dir, "finished")
        if not perf:
            plot_curves(run_dir, f"{cfg.recipe} ({precision_name(amp_dtype)}, {info.world_size} device(s))")
        per_device = f" ({fps / info.world_size:.2f} per device)" if fps and info.enabled else ""
        print(("\n" + table + "\n") + (f"Final Performance images/sec : {fps:.2f}{per_device}\n" if fps else "")
              + (f"Final Train Accuracy : {results['TrainAccuracy']:.2f}\n" if last_eval else "")
              + f"E2E Training Duration sec : {results['E2ETrainingTime']:.0f}", flush=True)
        if results["bad_images"]:
            print(f"warning: {results['bad_images']} unreadable image(s) were skipped", flush=True)
    distributed.shutdown()
    return results


def _run_epochs(cfg: RecipeConfig, perf: bool, loop: Loop, train_loader, val_loader, steps_per_epoch: int,
                info: distributed.DistInfo, eval_kw: dict, run_dir, meta: dict) -> tuple:
    """The epochs of a full run (train, validate, checkpoint) or the steps of a --perf run.
    Returns (timed images, timed seconds, epochs done, last evaluation or None)."""
    ema, net, model, optimizer, log = loop.ema, loop.net, loop.model, loop.optimizer, loop.log
    # Per-epoch reshuffling: both loaders' samplers take set_epoch.
    sampler = train_loader if hasattr(train_loader, "set_epoch") else getattr(train_loader, "sampler", None)
    timed_images, timed_seconds, epochs_done, best, last_eval = 0, 0.0, 0, -math.inf, None
    if perf:
        # A performance run: a fixed number of optimizer steps, timed after the warm-up steps.
        warm, steps = cfg.train.perf_warmup_steps, cfg.train.perf_steps
        epoch = 0
        while loop.global_step < warm + steps:
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            done_before = loop.global_step
            s = train_one_epoch(loop, train_loader, epoch, max_steps=warm + steps - loop.global_step,
                                time_after=max(warm - done_before, 0))
            timed_images += s.timed_images
            timed_seconds += s.timed_seconds
            epoch += 1
        timed_images *= info.world_size
        epochs_done = loop.global_step / steps_per_epoch
    else:
        for epoch in range(cfg.train.epochs):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            t_epoch = time.perf_counter()
            s = train_one_epoch(loop, train_loader, epoch, max_steps=steps_per_epoch,
                                time_after=min(cfg.train.perf_warmup_steps, steps_per_epoch // 2) if epoch == 0 else 0)
            timed_images += s.timed_images * info.world_size
            timed_seconds += s.timed_seconds
            epochs_done = epoch + 1
            record = dict(kind="epoch", epoch=epoch + 1, train_loss=s.loss, train_acc1=s.acc1,
                          lr=float(optimizer.param_groups[0]["lr"]), img_s=s.img_per_s * info.world_size,
                          epoch_time=None)
            last_epoch = epoch + 1 == cfg.train.epochs
            if last_epoch or (cfg.train.eval_every > 0 and (epoch + 1) % cfg.train.eval_every == 0):
                # The bare module: ranks evaluate unequal shards, and DDP's forward may communicate.
                last_eval = evaluate(ema.module if ema else (net if info.enabled else model), val_loader, **eval_kw)
                record.update(val_loss=last_eval["loss"], acc1=last_eval["acc1"], acc5=last_eval["acc5"])
            record["epoch_time"] = time.perf_counter() - t_epoch
            if info.is_main:
                log.write(**record)
                print(f"epoch {epoch + 1}/{cfg.train.epochs}: train loss {s.loss:.4f} acc {s.acc1:.2f}% "
                      f"| {record['img_s']:.0f} img/s"
                      + (f" | val loss {last_eval['loss']:.4f} Acc@1 {last_eval['acc1']:.2f}% "
                         f"Acc@5 {last_eval['acc5']:.2f}%" if "acc1" in record else ""), flush=True)
                _save(run_dir, loop, meta, epoch + 1, record.get("acc1"))
                if record.get("acc1") is not None and record["acc1"] > best:
                    best = record["acc1"]
                    save_weights(run_dir / BEST, ema.module if ema else net, {**meta, "epoch": epoch + 1, "acc1": best})

    return timed_images, timed_seconds, epochs_done, last_eval


def _save(run_dir, loop: Loop, meta: dict, epoch: float, acc1: float | None) -> None:
    """Weights (safetensors) and the training state, both replaced atomically."""
    weights_meta = {**meta, "epoch": epoch, "acc1": acc1}
    save_weights(run_dir / WEIGHTS, loop.net, weights_meta)
    if loop.ema is not None:
        save_weights(run_dir / "model_ema.safetensors", loop.ema.module, weights_meta)
    save_state(run_dir / STATE, {
        "epoch": epoch, "global_step": loop.global_step,
        "optimizer": loop.optimizer.state_dict(), "grad_step": loop.step.state_dict(),
        "ema": loop.ema.module.state_dict() if loop.ema is not None else None,
    })
