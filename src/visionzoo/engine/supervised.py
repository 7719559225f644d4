"""Supervised training: the one loop every supervised recipe runs.

``fit`` builds data, model and optimizer from a resolved config, then alternates
``train_one_epoch`` and ``evaluate``; a ``--perf`` run instead times a fixed number of steps.
A batch goes: loader (data/loading/build.py) → device → mixup/cutmix → autocast forward → loss →
GradStep (scale, backward, clip, step) → EMA."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from visionzoo import distributed
from visionzoo.checkpoint import BEST, WEIGHTS, load_latest, publish, save_checkpoint
from visionzoo.config import RecipeConfig, absolute_data_path, for_world_size, to_dict, to_yaml
from visionzoo.data.loading.build import build_datasets, build_loaders, cpu_fallbacks, failed_shards, loader_kind
from visionzoo.engine import lockstep
from visionzoo.engine.bad_images import BadImages, describe
from visionzoo.engine.evaluation.topk import evaluate
from visionzoo.engine.resume import RESIZE_WHY, per_rank, rng_state, set_rng_state, truncate_metrics
from visionzoo.engine.setup import build_training, set_loader_epoch, wrap_model
from visionzoo.engine.step import GradStep
from visionzoo.engine.stopping import Interrupted, StopVote, end_failed_run
from visionzoo.errors import UserError
from visionzoo.models.ghost_bn import bn_group_of, grouped_layers, reference_ranks, update_stats
from visionzoo.curves import plot_curves
from visionzoo.progress import Progress
from visionzoo.run_folder import MetricsLog, mark_status, new_run_dir, report_fallbacks, write_results
from visionzoo.runtime import (
    StopSignal,
    configure_determinism,
    precision_label,
    precision_name,
    resolve_amp,
    resolve_device,
    seed_everything,
    synchronize,
    weights_dtype,
)


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
    epoch: int = 0  # the epoch being trained (0-based)
    batches_in_epoch: int = 0  # batches of this epoch already trained on (resume skips them)
    epoch_sums: torch.Tensor | None = None  # this rank's loss×n, correct, n of the current epoch
    bad: BadImages = field(default_factory=BadImages)  # distinct training images, named
    nonfinite_skipped: int = 0
    nonfinite: torch.Tensor | None = None  # device flag: a non-finite loss was seen (checked lazily)
    skip_nonfinite: int = 0
    last_loss: float = float("nan")
    checkpoint_every: int = 0
    first_step_s: float | None = None  # wall time of this session's first step (includes torch.compile)
    # Over every session of a resumed run: timed training images (all ranks) and seconds, and the
    # wall time of the sessions before this one (so a resumed run's results cover the whole run).
    timed_images: int = 0
    timed_seconds: float = 0.0
    elapsed_before: float = 0.0
    checkpoint: Any = None  # callable writing a checkpoint of the current position (all ranks call it)
    stop: Any = None  # runtime.StopSignal
    vote: Any = None  # stopping.StopVote: the ranks agree on a stop signal
    sample_shape: tuple = ()  # (C, H, W) of a training image: the placeholder of a zero-weight step
    input_dtype: torch.dtype | None = None  # None: the weights' dtype (float64 with train.amp=fp64)


@dataclass
class EpochStats:
    loss: float = float("nan")
    acc1: float = float("nan")  # on the training batches (hard labels, before mixing)
    steps: int = 0
    images: int = 0
    timed_images: int = 0
    timed_seconds: float = 0.0

    @property
    def img_per_s(self) -> float:
        return self.timed_images / self.timed_seconds if self.timed_seconds > 0 else float("nan")


def _check_finite(loop: Loop, weights: bool = False) -> None:
    """Stop with a clear message if a non-finite loss went by since the last check, or (with
    ``weights``) if a weight or buffer is no longer finite: one sync."""
    flag = loop.nonfinite.clone() if loop.nonfinite is not None else torch.zeros((), device=loop.device)
    if weights:
        tensors = [t for t in loop.net.state_dict().values() if t.is_floating_point()]  # BN statistics too
        flag = flag + torch.stack([(~torch.isfinite(t)).any() for t in tensors]).float().sum()
    if bool(distributed.all_reduce_sum(flag) > 0):
        what = "the loss or the weights" if weights else "the loss"
        raise UserError(f"{what} became NaN/inf by step {loop.global_step}; the last good checkpoint "
                        "is kept. Lower optim.lr, use train.amp=bf16/none, or let train.skip_nonfinite=N "
                        "steps be skipped")


def train_one_epoch(loop: Loop, loader, max_steps: int = 0, time_after: int = 0) -> EpochStats:
    """Train on the rest of epoch ``loop.epoch`` (at most ``max_steps`` optimizer steps in the
    epoch when > 0). Throughput is timed from optimizer step ``time_after`` on, so warm-up
    (cuDNN autotuning, compilation, worker start-up) is left out."""
    loop.model.train()
    stats = EpochStats()
    if loop.epoch_sums is None:
        loop.epoch_sums = torch.zeros(3, dtype=torch.float64, device=loop.device)  # loss×n, correct, n
    sums = loop.epoch_sums
    autocast = torch.autocast(loop.device.type, dtype=loop.amp_dtype) if loop.amp_dtype else nullcontext()
    t_called = time.perf_counter()
    t_start = None if time_after > 0 else time.perf_counter()
    accum = loop.accum_steps
    done = loop.batches_in_epoch // accum  # optimizer steps already taken in this epoch
    total = min(len(loader) // accum + done, max_steps) if max_steps else len(loader) // accum + done
    grouped_bn = grouped_layers(loop.net) if accum > 1 else []
    dtype = loop.input_dtype or next((q.dtype for q in loop.net.parameters() if q.is_floating_point()), torch.float32)  # model.bn_group with micro-batches
    check_stop_every = 10 if distributed.world_size() > 1 else 1  # a collective per check on several ranks
    progress = Progress(loader, total * accum, f"epoch {loop.epoch + 1}", loop.progress, start=done * accum,
                        enabled=loop.log is not None)
    for images, targets, n_bad in progress:
        if done >= total:
            break
        if n_bad:
            loop.bad.add(n_bad)
        loop.batches_in_epoch += 1
        if loop.mixup is not None and len(images) % 2:
            # Mixing pairs sample i with sample B-1-i: a batch that lost an unreadable image drops one more.
            images, targets = images[:-1], targets[:-1]
        n = len(images) if images.numel() else 0
        if n == 0 and not lockstep.must_step_empty():
            continue  # one process: nothing to match, nothing to learn from
        update = loop.batches_in_epoch % accum == 0
        if update:
            for group in loop.optimizer.param_groups:
                group["lr"] = float(loop.lrs[min(loop.global_step, len(loop.lrs) - 1)])  # no NumPy scalars in state
        no_sync = loop.model.no_sync if (not update and hasattr(loop.model, "no_sync")) else nullcontext
        if n:
            images = images.to(loop.device, dtype, non_blocking=True, memory_format=loop.memory_format)
            hard_targets = targets = targets.to(loop.device, non_blocking=True)
            loop.sample_shape = tuple(images.shape[1:])
            if loop.mixup is not None:
                images, targets = loop.mixup(images, targets)
            if grouped_bn:  # running statistics from the step's first micro-batch, as the reference's rank 0
                update_stats(grouped_bn, loop.batches_in_epoch % accum == 1)
            with no_sync(), autocast:
                logits = loop.model(images)
                loss = loop.criterion(logits, targets)
        else:  # no usable image on this rank: a zero-weight step, in step with the other ranks
            with no_sync(), autocast:
                loss = lockstep.zero_weight_loss(loop.model, loop.net, lockstep.placeholder(
                    loop.sample_shape, loop.device, loop.memory_format).to(dtype))
        finite = torch.isfinite(loss.detach())
        # train.skip_nonfinite > 0 reads every step's loss (the one allowed per-step sync: skipping
        # exactly the bad steps needs it); otherwise the flag below is checked lazily.
        if loop.skip_nonfinite > 0 and not bool(distributed.all_reduce_sum(finite.float()) == distributed.world_size()):
            # Drop this step everywhere; stop once more than the allowed number went by.
            loop.nonfinite_skipped += 1
            loop.optimizer.zero_grad(set_to_none=True)
            if loop.nonfinite_skipped > loop.skip_nonfinite:
                raise UserError(f"{loop.nonfinite_skipped} steps had a NaN/inf loss (train.skip_nonfinite="
                                f"{loop.skip_nonfinite}); stopping, the last good checkpoint is kept")
            continue
        if loop.amp_dtype != torch.float16:  # fp16: the loss scaler skips such steps itself
            loop.nonfinite = loop.nonfinite + (~finite).float() if loop.nonfinite is not None else (~finite).float()
        loop.step(loss / accum, update=update)
        if n:
            sums += torch.stack([
                torch.nan_to_num(loss.detach().double()) * n,
                (logits.detach().argmax(1) == hard_targets).sum().double(),
                torch.full((), n, dtype=torch.float64, device=loop.device),  # a fill kernel, not a host→device copy
            ])
        stats.images += n
        if t_start is not None:
            stats.timed_images += n
        if not update:
            continue
        if loop.ema is not None:
            loop.ema.update(loop.net, step=loop.global_step)
        loop.global_step += 1
        done += 1
        stats.steps += 1
        if loop.first_step_s is None:  # one sync per run: how long compiling (or warming up) took
            synchronize(loop.device)
            loop.first_step_s = time.perf_counter() - t_called
        if stats.steps == time_after:
            synchronize(loop.device)
            t_start = time.perf_counter()
        # Logged every log_every steps, and the first step (the start of a warm-up shows).
        if loop.log is not None and loop.log_every > 0 and (loop.global_step % loop.log_every == 0 or loop.global_step == 1):
            loop.last_loss = float(loss.item())  # a sync, only at log points
            elapsed = time.perf_counter() - t_start if t_start else 0.0
            # All devices together (as the epoch lines and results.json): this rank's images × ranks.
            img_s = stats.timed_images * distributed.world_size() / elapsed if elapsed > 0 else None
            lr = float(loop.optimizer.param_groups[0]["lr"])
            loop.log.write(kind="step", epoch=loop.epoch + 1, step=loop.global_step, loss=loop.last_loss, lr=lr, img_s=img_s)
            progress.update(loss=loop.last_loss, lr=lr, **{"img/s": img_s})
        if loop.checkpoint is not None and done < total:
            if loop.checkpoint_every and loop.global_step % loop.checkpoint_every == 0:
                loop.checkpoint()
            if loop.global_step % check_stop_every == 0 and loop.stop is not None:
                code = loop.vote.vote(loop.stop.code)
                if code:
                    loop.checkpoint()
                    raise Interrupted(code, loop.stop.signum)
    progress.close()
    synchronize(loop.device)
    if t_start is not None:
        stats.timed_seconds = time.perf_counter() - t_start
    loss_sum, correct, count = distributed.all_reduce_sum(sums.clone()).tolist()
    if count > 0:
        stats.loss, stats.acc1 = loss_sum / count, 100.0 * correct / count
        loop.last_loss = stats.loss
    return stats


def fit(cfg: RecipeConfig, perf: bool = False, resume_dir: Path | None = None,
        on_finished: Callable[[Path], None] | None = None) -> dict:
    """Train ``cfg`` (or time it, with ``perf``) and write the run folder; with ``resume_dir``,
    continue that run from its newest usable checkpoint. ``on_finished(run_dir)`` runs on rank 0
    after a full run's results are written and before the trackers close (the CLI and the API
    write the report page there). Returns results.json's dict."""
    t0 = time.perf_counter()
    info = distributed.from_env()
    cfg = for_world_size(cfg, info.world_size)
    configure_determinism(cfg.train.deterministic, cfg.train.cudnn_benchmark)  # before CUDA initialises
    device = resolve_device(cfg.train.device, info.local_rank)
    if cfg.model.sync_bn and info.enabled and device.type == "cpu":
        raise UserError("model.sync_bn=true needs an accelerator (PyTorch's SyncBatchNorm has no CPU kernel)")
    distributed.init(info, device, cfg.train.dist_timeout)  # makes `device` current first
    seed_everything(cfg.train.seed + info.rank)
    amp_dtype = resolve_amp(cfg.train.amp, device)

    splits = build_datasets(cfg.data, train=True)
    num_classes = len(splits.classes)
    cfg.data.num_classes = num_classes  # recorded as built (config.yaml, checkpoints, exports), not the default
    cfg.data.path = absolute_data_path(cfg.data.path)  # eval/export/infer of the run work from any folder
    empty = getattr(splits.train, "empty_classes", [])
    if empty and info.is_main:  # they keep their label index; the model can never predict them well
        print(f"warning: {len(empty)} class folder(s) with no training images: {', '.join(empty[:5])}"
              + (" ..." if len(empty) > 5 else ""), flush=True)
    use_cl = cfg.model.channels_last
    memory_format = torch.channels_last if use_cl else torch.contiguous_format
    train_loader, val_loader = build_loaders(splits, cfg.data, cfg.data.batch_size_per_device, device,
                                             cfg.train.seed, info.rank, info.world_size, memory_format,
                                             rank_groups=reference_ranks(cfg, info.world_size))
    steps_per_epoch = len(train_loader) // cfg.train.accum_steps
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise UserError(f"the training split ({len(splits.train)} images) is smaller than one global "
                        f"batch ({cfg.data.batch_size}); lower data.batch_size")

    net, model_args, optimizer, lrs, stepper, criterion, mixup, ema = build_training(
        cfg, num_classes, device, amp_dtype, memory_format, steps_per_epoch, info.enabled)
    state = None
    if resume_dir is not None:
        tensors, state, weights_path = load_latest(resume_dir)
        if len(state["ranks"]) != info.world_size:
            raise UserError(f"{weights_path} was written by {len(state['ranks'])} process(es), this run has "
                            f"{info.world_size}: {RESIZE_WHY}; resume with --devices {len(state['ranks'])}")
        net.load_state_dict(tensors)
        optimizer.load_state_dict(state["optimizer"])
        stepper.load_state_dict(state["grad_step"])
        if ema is not None and "ema_weights" in state:
            ema.module.load_state_dict(state["ema_weights"])
    model = wrap_model(net, device, info.enabled, cfg.train.compile, cfg.model.bn_broadcast)
    if ema is not None and "ema_weights" not in (state or {}):
        ema.module.load_state_dict(net.state_dict())  # DDP gave every rank rank 0's weights: the EMA starts there

    run_dir = log = None
    if info.is_main:
        run_dir = Path(resume_dir) if resume_dir is not None else new_run_dir(cfg.recipe, cfg.output)
        if state is not None:
            truncate_metrics(run_dir, state["global_step"], state["epoch"])
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        log = MetricsLog(run_dir / "metrics.jsonl", run_dir / "tensorboard" if cfg.log.tensorboard else None)
        if cfg.log.mlflow or cfg.log.mlflow_uri or cfg.log.wandb:
            from visionzoo.trackers import open_trackers

            log.trackers = open_trackers(cfg, run_dir)
        mark_status(run_dir, "running")
        bn = f", BatchNorm over {group}" if (group := bn_group_of(cfg, net, info.world_size)) else ""
        where = (f"resuming {run_dir} at epoch {state['epoch'] + 1}, step {state['global_step']} ({weights_path.name})"
                 if state is not None else f"run folder {run_dir}")
        print(f"visionzoo: {'perf run' if perf else 'training'} {cfg.recipe} | {model_args['library']} "
              f"{model_args['name']} | {len(splits.train)} train / {len(splits.val)} val images, "
              f"{num_classes} classes | {info.world_size} × {device} {precision_label(amp_dtype or weights_dtype(cfg.train.amp), device)} | "
              f"batch {cfg.data.batch_size}{bn} | {where}", flush=True)

    loop = Loop(model, net, optimizer, stepper, lrs, criterion, device, amp_dtype, memory_format,
                cfg.train.accum_steps, mixup, ema, log, cfg.train.log_every, cfg.log.progress,
                skip_nonfinite=cfg.train.skip_nonfinite, checkpoint_every=cfg.train.checkpoint_every_steps,
                sample_shape=(cfg.data.in_chans, cfg.data.image_size, cfg.data.image_size),
                input_dtype=weights_dtype(cfg.train.amp))
    meta = {"config": to_dict(cfg), "model": model_args, "classes": splits.classes}
    best = {"acc1": -math.inf}
    if state is not None:
        loop.global_step, loop.epoch, loop.batches_in_epoch = state["global_step"], state["epoch"], state["batches_in_epoch"]
        best["acc1"] = state["best_acc1"]
        loop.last_loss = state.get("last_loss", loop.last_loss)
        loop.timed_images, loop.timed_seconds = state.get("timed", (0, 0.0))
        loop.elapsed_before = state.get("elapsed_s", 0.0)
        mine = state["ranks"][info.rank]
        # This rank's unreadable images (a checkpoint from before names were kept: its count, unnamed).
        loop.bad.load(mine.get("bad", {"names": [], "unnamed": mine.get("bad_images", 0)}))
        loop.epoch_sums = mine["epoch_sums"].to(device)
        set_rng_state(mine["rng"], device)  # last: setup above drew from the RNGs

    def checkpoint(acc1: float | None = None) -> None:
        """Write the current position (a collective: every rank calls it at the same step)."""
        _check_finite(loop, weights=True)  # never save weights that went through a NaN step
        train_state = {
            "epoch": loop.epoch, "batches_in_epoch": loop.batches_in_epoch, "global_step": loop.global_step,
            "optimizer": optimizer.state_dict(), "grad_step": stepper.state_dict(),
            "best_acc1": best["acc1"],
            "last_loss": loop.last_loss,
            "timed": [loop.timed_images, loop.timed_seconds], "elapsed_s": loop.elapsed_before + time.perf_counter() - t0,
            "ranks": per_rank({"rng": rng_state(device), "bad": loop.bad.state(), "epoch_sums": loop.epoch_sums.cpu()
                               if loop.epoch_sums is not None else torch.zeros(3, dtype=torch.float64)}),
        }
        if info.is_main:
            save_checkpoint(run_dir, loop.global_step, net, {**meta, "epoch": loop.epoch, "acc1": acc1},
                            train_state, cfg.train.keep_checkpoints, ema.module if ema is not None else None)

    loop.checkpoint, loop.vote = checkpoint, StopVote(device)
    eval_kw = dict(device=device, amp_dtype=amp_dtype, channels_last=use_cl,
                   reduce=distributed.all_reduce_sum if info.enabled else None,
                   progress=cfg.log.progress if info.is_main else "off")
    try:
        with StopSignal() as loop.stop:
            epochs_done, last_eval = _run_epochs(
                cfg, perf, loop, train_loader, val_loader, steps_per_epoch, info, eval_kw, run_dir, best)
    except BaseException as err:
        end_failed_run(err, info.is_main, run_dir, log, loop.global_step)
    fps = loop.timed_images / loop.timed_seconds if loop.timed_seconds > 0 else None
    results = _results(cfg, perf, loop, info, device, amp_dtype, last_eval, fps, epochs_done, t0, run_dir)
    results.update(loader=loader_kind(train_loader), cpu_fallbacks=cpu_fallbacks(train_loader, device),
                   bad_shards=failed_shards(train_loader, val_loader))
    if info.is_main:
        log.close()
        table = write_results(run_dir, results)
        mark_status(run_dir, "finished")
        if not perf:
            plot_curves(run_dir, f"{cfg.recipe} ({precision_name(amp_dtype or weights_dtype(cfg.train.amp))}, {info.world_size} device(s))")
            if on_finished is not None:
                on_finished(run_dir)
        per_device = f" ({fps / info.world_size:.2f} per device)" if fps and info.enabled else ""
        print(("\n" + table + "\n") + (f"Final Performance images/sec : {fps:.2f}{per_device}\n" if fps else "")
              + (f"Final Train Accuracy : {results['TrainAccuracy']:.2f}\n" if last_eval else "")
              + f"E2E Training Duration sec : {results['E2ETrainingTime']:.0f}", flush=True)
        if results["bad_images"]:
            parts = [describe(split, n, results["bad_image_names"][split])
                     for split, n in results["bad_images_per_split"].items() if n]
            print(f"warning: {results['bad_images']} unreadable image(s) were skipped: {'; '.join(parts)}", flush=True)
        report_fallbacks(results["cpu_fallbacks"])
        if cfg.train.compile and loop.first_step_s:
            print(f"torch.compile: the first step took {loop.first_step_s:.1f} s (compilation included)", flush=True)
        log.finish(run_dir, results, "FINISHED")
    distributed.shutdown()
    return results


def _results(cfg: RecipeConfig, perf: bool, loop: Loop, info, device, amp_dtype, last_eval: dict | None,
             fps: float | None, epochs_done: float, t0: float, run_dir) -> dict:
    """results.json: the seed-style row plus the figures the seeds' scripts print."""
    train_bad = loop.bad.over_ranks()  # a collective: every rank builds the results
    return {
        "recipe": cfg.recipe,
        "Acc@1": last_eval["acc1"] if last_eval else None,
        "Acc@5": last_eval["acc5"] if last_eval else None,
        "FPS": fps,
        "FPS_per_device": fps / info.world_size if fps else None,
        "devices": info.world_size,
        "BN group": bn_group_of(cfg, loop.net, info.world_size),  # images per BatchNorm statistic (None: no BN)
        "epochs": round(epochs_done, 2),
        "precision": precision_name(amp_dtype or weights_dtype(cfg.train.amp)),
        "torch": torch.__version__.split("+")[0],
        "mode": "perf" if perf else "full",
        "batch_size": cfg.data.batch_size,
        "steps": loop.global_step,
        "ActualFPS": fps,
        "TrainingTime": 1000.0 * cfg.data.batch_size / fps if fps else None,  # ms per optimizer step
        "TrainAccuracy": last_eval["acc1"] if last_eval else None,  # the seeds' name for final val Acc@1
        "ActualLoss": loop.last_loss,
        "E2ETrainingTime": loop.elapsed_before + time.perf_counter() - t0,  # all sessions of a resumed run
        # Distinct images (each counted once, whatever the epochs) over all ranks, per split, the first few named.
        "bad_images": train_bad.count + (last_eval["bad_images"] if last_eval else 0),
        "bad_images_per_split": {"train": train_bad.count, "val": last_eval["bad_images"] if last_eval else 0},
        "bad_image_names": {"train": train_bad.first(), "val": last_eval.get("bad_names", []) if last_eval else []},
        "skipped_steps": loop.step.skipped + loop.nonfinite_skipped,
        "first_step_s": loop.first_step_s,  # includes compilation with train.compile
        # DDP keeps replicas equal (BatchNorm statistics too where averaged); checked, with the EMA
        "ranks_in_sync": distributed.params_in_sync(loop.net, loop.ema.module if loop.ema is not None else None,
                                                    buffers=cfg.model.bn_average),
        "device": str(device),
        "run_dir": str(run_dir) if run_dir else None,
    }


def timed_steps(loop: Loop, loader, until_step: int, time_from_step: int) -> tuple[int, float]:
    """Train until ``loop.global_step == until_step`` (over as many passes of ``loader`` as that
    takes), timing the steps after ``time_from_step``: a performance run. Returns (images over
    all ranks, seconds) of the timed steps."""
    images, seconds = 0, 0.0
    while loop.global_step < until_step:
        set_loader_epoch(loader, loop.epoch, 0)
        s = train_one_epoch(loop, loader, max_steps=until_step - loop.global_step,
                            time_after=max(time_from_step - loop.global_step, 0))
        images += s.timed_images * distributed.world_size()
        seconds += s.timed_seconds
        loop.epoch, loop.batches_in_epoch, loop.epoch_sums = loop.epoch + 1, 0, None
    return images, seconds


def _run_epochs(cfg: RecipeConfig, perf: bool, loop: Loop, train_loader, val_loader, steps_per_epoch: int,
                info: distributed.DistInfo, eval_kw: dict, run_dir, best: dict) -> tuple:
    """The epochs of a full run (train, validate, checkpoint) or the steps of a --perf run; timed
    images and seconds accumulate in ``loop``. Returns (epochs done, last evaluation or None)."""
    last_eval = None
    eval_model = loop.ema.module if loop.ema is not None else (loop.net if info.enabled else loop.model)
    if perf:
        # A performance run: a fixed number of optimizer steps, timed after the warm-up steps.
        warm, total = cfg.train.perf_warmup_steps, cfg.train.perf_warmup_steps + cfg.train.perf_steps
        loop.timed_images, loop.timed_seconds = timed_steps(loop, train_loader, total, warm)
        if cfg.model.bn_average:
            distributed.average_bn_stats(loop.net, loop.ema.module if loop.ema is not None else None)
        loop.checkpoint()
        return loop.global_step / steps_per_epoch, None

    first_epoch = loop.epoch
    for epoch in range(first_epoch, cfg.train.epochs):
        set_loader_epoch(train_loader, epoch, loop.batches_in_epoch)
        t_epoch = time.perf_counter()
        warm = min(cfg.train.perf_warmup_steps, steps_per_epoch // 2) if epoch == first_epoch else 0
        s = train_one_epoch(loop, train_loader, max_steps=steps_per_epoch, time_after=warm)
        _check_finite(loop)
        # model.bn_average: every rank then evaluates and saves the same BatchNorm statistics
        # (timm); otherwise each keeps its own and rank 0's are saved, as torchvision's and mmcls's.
        if cfg.model.bn_average:
            distributed.average_bn_stats(loop.net, loop.ema.module if loop.ema is not None else None)
        loop.timed_images += s.timed_images * info.world_size
        loop.timed_seconds += s.timed_seconds
        record = dict(kind="epoch", epoch=epoch + 1, step=loop.global_step, train_loss=s.loss, train_acc1=s.acc1,
                      lr=float(loop.optimizer.param_groups[0]["lr"]), img_s=s.img_per_s * info.world_size)
        if epoch + 1 == cfg.train.epochs or (cfg.train.eval_every > 0 and (epoch + 1) % cfg.train.eval_every == 0):
            # The bare module: ranks evaluate unequal shards, and DDP's forward may communicate.
            last_eval = evaluate(eval_model, val_loader, **eval_kw)
            record.update(val_loss=last_eval["loss"], acc1=last_eval["acc1"], acc5=last_eval["acc5"])
        record["epoch_time"] = time.perf_counter() - t_epoch
        loop.epoch, loop.batches_in_epoch, loop.epoch_sums = epoch + 1, 0, None
        improved = record.get("acc1") is not None and record["acc1"] > best["acc1"]
        if improved:
            best["acc1"] = record["acc1"]
        if info.is_main:  # before the checkpoint: a resume from it then finds the epoch's record
            loop.log.write(**record)
        loop.checkpoint(record.get("acc1"))
        if info.is_main:
            print(f"epoch {epoch + 1}/{cfg.train.epochs}: train loss {s.loss:.4f} acc {s.acc1:.2f}% "
                  f"| {record['img_s']:.0f} img/s" + (f" ({info.world_size} devices)" if info.enabled else "")
                  + (f" | val loss {last_eval['loss']:.4f} Acc@1 {last_eval['acc1']:.2f}% "
                     f"Acc@5 {last_eval['acc5']:.2f}%" if "acc1" in record else ""), flush=True)
            if improved:
                publish(run_dir / ("model_ema.safetensors" if loop.ema is not None else WEIGHTS), run_dir / BEST)
    if last_eval is None and first_epoch >= cfg.train.epochs > 0:
        # Resumed after the last epoch's checkpoint (killed before the results were written):
        # the final weights are there; evaluate them, as the last epoch did.
        last_eval = evaluate(eval_model, val_loader, **eval_kw)
    return loop.epoch, last_eval
