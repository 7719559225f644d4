"""Self-supervised training with DINO (facebookresearch/dino main_dino.py), read top to bottom.

A step: multi-crop batch → teacher (EMA network, global crops only, no gradients) and student
(all crops) under autocast → cross-entropy of the centred, sharpened teacher distribution of
each global crop against the student's distribution of every *other* crop → backward, per-tensor
gradient clipping, last layer frozen in the first epoch(s), optimizer step → teacher EMA update
→ centre update (mean teacher output over all ranks).

LR, weight decay, teacher momentum and teacher temperature are precomputed per optimizer step
(numpy arrays indexed by the global step). optim.lr is per 256 images: the peak LR is
optim.lr × global batch / 256, on any number of devices. Labels are never read in training; the
teacher backbone is evaluated by weighted k-NN after the last epoch (and every train.eval_every
epochs), and that k-NN top-1 is the run's Acc@1. Checkpoints (epoch ends, every
train.checkpoint_every_steps, and on SIGTERM/SIGINT) hold the teacher backbone as
model.safetensors and student, teacher, centre, optimizer, scaler, the position in the epoch and
every rank's RNG streams in the state file: a resumed run continues exactly."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from visionzoo import distributed
from visionzoo.checkpoint import load_latest, save_checkpoint
from visionzoo.config import RecipeConfig, for_world_size, to_dict, to_yaml
from visionzoo.data.augment.batched import MultiCropAugment
from visionzoo.data.augment.multicrop import MultiCropTransform
from visionzoo.data.loading.build import build_datasets, cpu_fallbacks, failed_shards, loader_kind, multicrop_loader
from visionzoo.data.loading.device_decode import DeviceDecodeLoader
from visionzoo.data.loading.in_memory import InMemoryMultiCropLoader
from visionzoo.data.sources.tensor_dataset import TensorImageDataset
from visionzoo.engine import lockstep
from visionzoo.engine.bad_images import BadImages, describe
from visionzoo.engine.dino_schedules import clip_per_tensor, cosine_schedule, teacher_temp_schedule
from visionzoo.engine.evaluation.knn import knn_eval
from visionzoo.engine.resume import RESIZE_WHY, per_rank, rng_state, set_rng_state, truncate_metrics
from visionzoo.engine.setup import set_loader_epoch
from visionzoo.engine.stopping import Interrupted, StopVote, end_failed_run
from visionzoo.errors import UserError
from visionzoo.models import build_model, create
from visionzoo.models.dino import DINOLoss, build_dino, cancel_last_layer_grads, update_teacher
from visionzoo.models.weights import load_weights
from visionzoo.optim import build_optimizer
from visionzoo.curves import plot_curves
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
)


class DinoStep:
    """scale → backward → unscale → per-tensor clip → drop last-layer grads (frozen epochs) →
    step → update, with a GradScaler for fp16 (a no-op otherwise)."""

    def __init__(self, optimizer: torch.optim.Optimizer, student: nn.Module, device: torch.device,
                 amp_dtype: torch.dtype | None, loss_scale: str, init_scale: float, clip_grad: float):
        self.optimizer, self.student, self.clip_grad = optimizer, student, clip_grad
        fp16 = amp_dtype == torch.float16
        self.static_scale = float(loss_scale) if fp16 and loss_scale != "dynamic" else None
        self.scaler = torch.amp.GradScaler(device.type, init_scale=self.static_scale or init_scale, enabled=fp16)
        self.params = [p for p in student.parameters() if p.requires_grad]

    def __call__(self, loss: torch.Tensor, freeze_last_layer: bool) -> None:
        self.scaler.scale(loss).backward()
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            clip_per_tensor(self.params, self.clip_grad)
        if freeze_last_layer:
            cancel_last_layer_grads(self.student)
        self.scaler.step(self.optimizer)
        self.scaler.update(self.static_scale)
        self.optimizer.zero_grad(set_to_none=True)


def dino_loader(cfg: RecipeConfig, ds, device: torch.device, rank: int, world_size: int):
    """Multi-crop batches of the training images ``ds`` (labels carried, never used), augmented a
    batch at a time on the device for in-memory data (data.device_resident) and for ImageFolder
    JPEGs decoded there (data.decode=device), per image in DataLoader workers otherwise."""
    d, dc, batch, seed = cfg.data, cfg.dino, cfg.data.batch_size_per_device, cfg.train.seed
    if d.device_resident and isinstance(ds, TensorImageDataset):
        return InMemoryMultiCropLoader(ds, batch, device, d, dc, seed, rank, world_size)
    if d.decode == "device":
        return DeviceDecodeLoader(ds, batch, d.workers, device, d, seed, rank, world_size,
                                  augment=MultiCropAugment(d, dc))
    if not hasattr(ds, "transform"):
        raise UserError(f"data.name={d.name} gives no per-image transform to apply multi-crop to")
    ds.transform = MultiCropTransform(d, dc)
    return multicrop_loader(ds, batch, d.workers, seed, rank, world_size, pin_memory=device.type == "cuda",
                            device=device)


def _feature_dim(backbone: nn.Module, in_chans: int, size: int) -> int:
    dim = getattr(backbone, "num_features", None)
    if dim is None:
        with torch.no_grad():
            dim = backbone.eval()(torch.zeros(2, in_chans, size, size)).shape[-1]
        backbone.train()
    if not dim:
        raise UserError("the DINO backbone must return features with num_classes=0 (use a timm model)")
    return int(dim)


class DinoTraining:
    """Student, teacher, loss (with its centre), optimizer and step of one DINO run, and the
    training step itself, as ``fit_dino`` and ``visionzoo bench`` both use them."""

    def __init__(self, student: nn.Module, teacher: nn.Module, criterion: DINOLoss, optimizer: torch.optim.Optimizer,
                 stepper: DinoStep, amp_dtype: torch.dtype | None, device: torch.device, model_args: dict):
        self.student, self.teacher, self.criterion = student, teacher, criterion
        self.optimizer, self.stepper, self.model_args = optimizer, stepper, model_args
        self.model: nn.Module = student  # what the student's forward goes through (DDP, compiled)
        self.teacher_fwd: nn.Module = teacher
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
        self.reduce = None
        self.device = device
        # train.skip_nonfinite > 0: read every step's loss (one sync per step, the price of skipping
        # exactly the bad steps); otherwise count non-finite losses on the device (``nonfinite_losses``).
        self.check_each_step = False
        self.nonfinite: torch.Tensor | None = None

    def wrap(self, device: torch.device, ddp: bool, compile: bool, sync_teacher: bool = True) -> None:
        """DDP around the student on several ranks (then, with ``sync_teacher``, the teacher
        starts from rank 0's student, as DDP gave every rank), and torch.compile when asked."""
        if ddp:
            self.model = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[device.index] if device.type == "cuda" else None)
            self.reduce = distributed.all_reduce_sum
            if sync_teacher:
                self.teacher.load_state_dict(self.student.state_dict())
        if compile:
            self.model, self.teacher_fwd = torch.compile(self.model), torch.compile(self.teacher)

    def step(self, crops: list[torch.Tensor], lr: float, wd: float, momentum: float, teacher_temp: float,
             freeze_last_layer: bool, weight: float = 1.0) -> torch.Tensor | None:
        """One optimizer step on a multi-crop batch already on the device; returns this rank's
        loss as a device tensor (``mean_loss`` reads it, averaged over ranks), nothing read back.

        A non-finite loss: with ``check_each_step`` every rank reads the loss summed over ranks
        (one sync per step), takes no step and returns None (the caller counts it); otherwise the
        step is taken and counted on the device, and the caller checks ``nonfinite_losses`` at its
        log points, checkpoints and epoch ends, stopping before any diverged weights are saved.

        ``weight=0``: ``crops`` are placeholders (this rank's batch held no usable image); the
        step runs with a zero loss, in eval mode, and adds nothing to the teacher centre."""
        for i, group in enumerate(self.optimizer.param_groups):  # floats: the state loads weights_only
            group["lr"] = lr
            if i == 0:  # only the first group (weights, not biases/norms) is decayed
                group["weight_decay"] = wd
        with self.autocast():
            with torch.no_grad():
                teacher_out = self.teacher_fwd(crops[:2])
            if weight:
                loss = self.criterion(self.model(crops), teacher_out, teacher_temp)
            else:
                loss = lockstep.zero_weight_loss(self.model, self.student, crops)
        if self.check_each_step:
            # Summed over ranks, so that a NaN on any rank skips the step on every rank alike.
            if not math.isfinite(distributed.all_reduce_sum(loss.detach().float().clone()).item()):
                self.optimizer.zero_grad(set_to_none=True)
                return None
        else:
            bad = (~torch.isfinite(loss.detach())).float()
            self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad
        self.stepper(loss, freeze_last_layer)
        update_teacher(self.student, self.teacher, momentum)
        self.criterion.update_center(teacher_out, self.reduce, weight)
        return loss.detach()

    def mean_loss(self, loss: torch.Tensor | float | None) -> float:
        """A step's loss averaged over ranks, on the host (a sync; every rank must call it). A
        float (a resumed run's last loss) or None (no step yet: nan) is returned as it is."""
        if not isinstance(loss, torch.Tensor):
            return float("nan") if loss is None else float(loss)
        return distributed.all_reduce_sum(loss.float().clone()).item() / distributed.world_size()

    def nonfinite_losses(self) -> int:
        """Steps with a NaN/inf loss so far, on any rank (a sync; every rank must call it)."""
        flag = self.nonfinite.clone() if self.nonfinite is not None else torch.zeros((), device=self.device)
        return int(distributed.all_reduce_sum(flag).item())


def build_dino_training(cfg: RecipeConfig, device: torch.device, amp_dtype: torch.dtype | None,
                        ddp: bool = False) -> DinoTraining:
    """The recipe's student and teacher (same initial weights), loss, optimizer and step, on
    ``device``. With ``ddp`` on an accelerator, BatchNorm layers (of the backbone or of a
    dino.use_bn_in_head head) become SyncBatchNorm in student and teacher, as in the reference:
    the teacher is no DDP module, so nothing else would keep its statistics equal over ranks."""
    d, dc = cfg.data, cfg.dino
    # model.weights: the backbone's weights, and the head's too when the file is a DINO training checkpoint.
    backbone, model_args = build_model(replace(cfg.model, weights=None), 0, d.in_chans)
    head_state = load_weights(backbone, model_args, cfg.model.weights, cfg.model.checkpoint_key) if cfg.model.weights else None
    teacher_args = {**model_args, "drop_rate": 0.0, "drop_path_rate": 0.0}  # the reference's teacher
    student, teacher = build_dino(backbone, create(teacher_args), _feature_dim(backbone, d.in_chans, d.image_size), dc,
                                  head_state)
    student, teacher = student.to(device), teacher.to(device)
    if ddp and device.type != "cpu":  # SyncBatchNorm has no CPU kernel; fit_dino averages the statistics there
        from timm.layers import convert_sync_batchnorm  # also converts timm's BatchNormAct2d

        student, teacher = convert_sync_batchnorm(student), convert_sync_batchnorm(teacher)
    criterion = DINOLoss(dc.out_dim, dc.student_temp, dc.center_momentum).to(device)
    optimizer = build_optimizer(student, cfg.optim, device.type)
    stepper = DinoStep(optimizer, student, device, amp_dtype, cfg.train.loss_scale, cfg.train.init_scale, dc.clip_grad)
    training = DinoTraining(student, teacher, criterion, optimizer, stepper, amp_dtype, device, model_args)
    training.check_each_step = cfg.train.skip_nonfinite > 0
    return training


def fit_dino(cfg: RecipeConfig, perf: bool = False, resume_dir: Path | None = None,
             on_finished: Callable[[Path], None] | None = None) -> dict:
    """Train ``cfg`` with DINO (or time it, with ``perf``); write the run folder; with
    ``resume_dir``, continue that run from its newest checkpoint (an epoch end). ``on_finished``
    as for ``supervised.fit``. Returns results."""
    t0 = time.perf_counter()
    info = distributed.from_env()
    base_lr = cfg.optim.lr  # per 256 images; for_world_size's own LR rescaling is not wanted here
    cfg = for_world_size(cfg, info.world_size)
    cfg.optim.lr = base_lr
    d, dc, t = cfg.data, cfg.dino, cfg.train
    configure_determinism(t.deterministic, t.cudnn_benchmark)  # before CUDA initialises
    device = resolve_device(t.device, info.local_rank)
    distributed.init(info, device, t.dist_timeout)  # makes `device` current first
    seed_everything(t.seed + info.rank)
    amp_dtype = resolve_amp(t.amp, device)
    if t.accum_steps != 1:
        raise UserError("task=dino does not support train.accum_steps (centre and teacher move every step)")

    splits = build_datasets(d, train=True)
    loader, n_images, classes = dino_loader(cfg, splits.train, device, info.rank, info.world_size), len(splits.train), splits.classes
    if classes:  # the labels k-NN evaluates with, recorded as found (not the default)
        cfg.data.num_classes = len(classes)
    steps_per_epoch = min(len(loader), t.max_steps_per_epoch) if t.max_steps_per_epoch else len(loader)
    if steps_per_epoch < 1:
        raise UserError(f"the training split ({n_images} images) is smaller than one global batch "
                        f"({d.batch_size}); lower data.batch_size")

    parts = build_dino_training(cfg, device, amp_dtype, ddp=info.enabled)
    student, teacher, criterion, optimizer, stepper = (parts.student, parts.teacher, parts.criterion,
                                                       parts.optimizer, parts.stepper)
    model_args = parts.model_args
    teacher_args = {**model_args, "drop_rate": 0.0, "drop_path_rate": 0.0}  # the reference's teacher
    step, first_epoch, state = 0, 0, None
    if resume_dir is not None:
        _, state, _ = load_latest(resume_dir)
        if len(state["ranks"]) != info.world_size:
            raise UserError(f"{resume_dir} was written by {len(state['ranks'])} process(es), this run has "
                            f"{info.world_size}: {RESIZE_WHY}; resume with --devices {len(state['ranks'])}")
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        criterion.load_state_dict(state["dino_loss"])
        optimizer.load_state_dict(state["optimizer"])
        stepper.scaler.load_state_dict(state["scaler"])
        step, first_epoch = state["global_step"], state["epoch"]
    parts.wrap(device, info.enabled, t.compile, sync_teacher=resume_dir is None)
    # At least one epoch of schedule, so that a --perf run of a 0-epoch config has values.
    sched_epochs = max(t.epochs, 1)
    total = sched_epochs * steps_per_epoch
    peak_lr = base_lr * d.batch_size / 256  # the linear scaling rule of the reference
    # The reference's cosine_scheduler: linspace warm-up from warmup_lr that reaches the peak on
    # its last step, then cosine to min_lr (schedule.name is not consulted: DINO's is cosine).
    lrs = cosine_schedule(peak_lr, cfg.schedule.min_lr, total, int(round(cfg.schedule.warmup_epochs * steps_per_epoch)),
                          cfg.schedule.warmup_lr)
    wds = cosine_schedule(cfg.optim.weight_decay, dc.weight_decay_end, total)
    moms = cosine_schedule(dc.momentum_teacher, 1.0, total)
    temps = teacher_temp_schedule(dc.warmup_teacher_temp, dc.teacher_temp, dc.warmup_teacher_temp_epochs,
                                  sched_epochs, steps_per_epoch)

    run_dir = log = None
    meta = {"config": to_dict(cfg), "model": teacher_args, "classes": classes, "task": "dino"}
    if info.is_main:
        run_dir = Path(resume_dir) if resume_dir is not None else new_run_dir(cfg.recipe, cfg.output)
        if resume_dir is not None:
            truncate_metrics(run_dir, step, first_epoch)
            where = f"resuming {run_dir} at epoch {first_epoch + 1}, step {step}"
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        log = MetricsLog(run_dir / "metrics.jsonl", run_dir / "tensorboard" if cfg.log.tensorboard else None)
        if cfg.log.mlflow or cfg.log.mlflow_uri or cfg.log.wandb:
            from visionzoo.trackers import open_trackers

            log.trackers = open_trackers(cfg, run_dir)
        mark_status(run_dir, "running")
        print(f"visionzoo: DINO {'perf run' if perf else 'training'} {cfg.recipe} | {model_args['library']} "
              f"{model_args['name']} | {n_images} images × {2 + dc.local_crops_number} crops | "
              f"{info.world_size} × {device} {precision_label(amp_dtype, device)} | batch {d.batch_size}, peak lr "
              f"{peak_lr:.3g} | " + (where if resume_dir else f"run folder {run_dir}"),
              flush=True)

    def checkpoint(epoch: float, acc1: float | None, batches_in_epoch: int = 0, sums: tuple = (0.0, 0, 0)) -> None:
        """Write the position: ``epoch`` epochs done plus ``batches_in_epoch`` batches of the next,
        with that epoch's (loss sum, images, steps) so far (a collective: every rank calls it at
        the same step and hands over its RNG streams). Never saves weights a NaN/inf loss went through."""
        check_finite()
        sums = tuple(float(v) for v in sums)  # the loss sum lives on the device: read here
        ranks = per_rank({"rng": rng_state(device), "epoch_sums": torch.tensor(sums, dtype=torch.float64)})
        loss_now = parts.mean_loss(last_loss)  # every rank: an all-reduce
        if info.is_main:
            # Throughput and wall time so far, so a resumed run's results cover every session.
            open_s = time.perf_counter() - t_mark if timing and batches_in_epoch else 0.0
            state = {"epoch": epoch, "global_step": step, "batches_in_epoch": batches_in_epoch,
                     "student": student.state_dict(), "teacher": teacher.state_dict(),
                     "dino_loss": criterion.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": stepper.scaler.state_dict(), "nonfinite": nonfinite, "ranks": ranks,
                     "last_loss": loss_now, "timed": [timed_images, timed_seconds + open_s],
                     "elapsed_s": elapsed_before + time.perf_counter() - t0}
            save_checkpoint(run_dir, step, teacher.backbone, {**meta, "epoch": epoch, "acc1": acc1}, state,
                            t.keep_checkpoints)

    def check_finite() -> None:
        """Stop if a NaN/inf loss went by (counted on the device; one sync, on every rank)."""
        if parts.nonfinite_losses() > 0:
            raise UserError(f"the loss became NaN/inf by epoch {epoch + 1}, step {step}: training diverged (try a "
                            f"lower optim.lr, train.amp=bf16 or none, a longer schedule.warmup_epochs, or "
                            f"train.skip_nonfinite=N)")

    last_loss, knn, nonfinite, skip, resumed_sums = float("nan"), None, 0, 0, (0.0, 0, 0)
    if state is not None:
        nonfinite, skip = state.get("nonfinite", 0), state.get("batches_in_epoch", 0)
        mine = state["ranks"][info.rank]
        resumed_sums = tuple(mine["epoch_sums"].tolist())
        set_rng_state(mine["rng"], device)  # last: the set-up above drew from the RNGs
    check_stop_every = 10 if info.enabled else 1  # a collective per check on several ranks
    vote = StopVote(device)
    crop_shapes = [(d.in_chans, d.image_size, d.image_size)] * 2 + \
        [(d.in_chans, dc.local_crop_size, dc.local_crop_size)] * dc.local_crops_number
    # Throughput counts training steps only (no k-NN, no checkpoints), after `warm` untimed steps.
    warm = t.perf_warmup_steps if perf else min(t.perf_warmup_steps, steps_per_epoch // 2)
    stop_at = step + warm + t.perf_steps
    timing, timed_images, timed_seconds, t_mark, warm_at = warm == 0, 0, 0.0, 0.0, step + warm
    elapsed_before = 0.0
    if state is not None:
        last_loss, elapsed_before = state.get("last_loss", last_loss), state.get("elapsed_s", 0.0)
        timed_images, timed_seconds = state.get("timed", (0, 0.0))
    epoch, first_step_s, t_loop = first_epoch, None, time.perf_counter()
    bad = BadImages()  # undecodable training images, each once (this session's)
    try:
        with StopSignal() as stop:
            while (step < stop_at) if perf else (epoch < t.epochs):
                set_loader_epoch(loader, epoch, skip)  # skip: batches a resumed epoch has done already
                student.train()
                teacher.train()  # as the reference; the teacher has no dropout or drop path
                (loss_sum, count), done_in_epoch = (resumed_sums[:2] if skip else (0.0, 0)), int(resumed_sums[2]) if skip else 0
                loss_sum = torch.full((), loss_sum, dtype=torch.float64, device=device)  # summed on the device
                seen, fresh, skip = skip, 0, 0  # seen: batches of this epoch consumed; fresh: images this session
                t_epoch = t_mark = time.perf_counter()
                for crops, _, n_bad in loader:
                    seen += 1
                    if n_bad:
                        bad.add(n_bad)
                    real = bool(crops)  # False: every image of the batch was unreadable
                    if not real and not lockstep.must_step_empty():
                        continue
                    it = min(step, total - 1)  # a perf run may outlast the schedule
                    if real:
                        crops = [c.to(device, non_blocking=True) for c in crops]
                        crop_shapes = [tuple(c.shape[1:]) for c in crops]
                    else:  # a zero-weight step on placeholders, in step with the other ranks (lockstep.py)
                        crops = [lockstep.placeholder(s, device) for s in crop_shapes]
                    loss = parts.step(crops, float(lrs[it]), float(wds[it]), float(moms[it]), float(temps[it]),
                                      freeze_last_layer=epoch < dc.freeze_last_layer, weight=float(real))
                    if loss is None:  # train.skip_nonfinite > 0: a NaN/inf loss, no step taken on any rank
                        nonfinite += 1
                        if nonfinite > t.skip_nonfinite:
                            raise UserError(f"{nonfinite} steps had a NaN/inf loss by epoch {epoch + 1}, step {step}: "
                                            f"training diverged (train.skip_nonfinite={t.skip_nonfinite}; try a "
                                            f"lower optim.lr, train.amp=bf16 or none, a longer schedule.warmup_epochs)")
                        continue
                    n = crops[0].shape[0] if real else 0
                    last_loss = loss
                    loss_sum, count, fresh = loss_sum + loss.double() * n, count + n, fresh + n
                    step, done_in_epoch = step + 1, done_in_epoch + 1
                    if first_step_s is None:  # one sync per run: how long compiling (or warming up) took
                        synchronize(device)
                        first_step_s = time.perf_counter() - t_loop
                    if timing:
                        timed_images += n * info.world_size
                    elif step == warm_at:
                        synchronize(device)
                        timing, t_mark = True, time.perf_counter()
                    # A log point (every log_every steps, and the first step): the host reads, on every rank.
                    if t.log_every > 0 and (step % t.log_every == 0 or step == 1):
                        check_finite()
                        value = parts.mean_loss(loss)
                        elapsed = timed_seconds + (time.perf_counter() - t_mark if timing else 0.0)
                        rate = timed_images / elapsed if elapsed > 0 and timed_images else None
                        if info.is_main:
                            log.write(kind="step", epoch=epoch + 1, step=step, loss=value, lr=float(lrs[it]),
                                      wd=float(wds[it]), momentum=float(moms[it]), teacher_temp=float(temps[it]),
                                      img_s=rate)
                            print(f"epoch {epoch + 1} step {done_in_epoch}/{steps_per_epoch} loss {value:.4f} "
                                  f"lr {lrs[it]:.3g}" + (f" {rate:.0f} img/s" if rate else ""), flush=True)
                    if done_in_epoch >= steps_per_epoch or (perf and step >= stop_at):
                        break
                    if not perf:  # mid-epoch checkpoints, and SIGTERM/SIGINT agreed on by all ranks
                        position = (epoch, None, seen, (loss_sum, count, done_in_epoch))
                        if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
                            checkpoint(*position)
                        if step % check_stop_every == 0 and (code := vote.vote(stop.code)):
                            checkpoint(*position)
                            raise Interrupted(code, stop.signum)
                synchronize(device)
                if timing:
                    timed_seconds += time.perf_counter() - t_mark
                train_seconds = time.perf_counter() - t_epoch
                epoch += 1
                distributed.average_bn_stats(student, teacher)  # BN without SyncBN (CPU): ranks agree
                if perf:
                    continue
                check_finite()
                sums = distributed.all_reduce_sum(torch.stack([loss_sum, torch.full_like(loss_sum, count)]))
                record = dict(kind="epoch", epoch=epoch, step=step, train_loss=float(sums[0] / sums[1].clamp(min=1)),
                              lr=float(optimizer.param_groups[0]["lr"]), img_s=fresh * info.world_size / train_seconds)
                if epoch == t.epochs or (t.eval_every > 0 and epoch % t.eval_every == 0):
                    knn = _knn(teacher.backbone, cfg, device, amp_dtype)
                    record.update(knn={str(k): v for k, v in knn.items()}, acc1=knn[dc.knn_report_k][0],
                                  acc5=knn[dc.knn_report_k][1])
                record["epoch_time"] = time.perf_counter() - t_epoch
                if info.is_main:  # before the checkpoint: a resume from it then finds the epoch's record
                    log.write(**record)
                checkpoint(epoch, record.get("acc1"))
                if info.is_main:
                    print(f"epoch {epoch}/{t.epochs}: loss {record['train_loss']:.4f}" + (
                        f" | k-NN (k={dc.knn_report_k}) top-1 {record['acc1']:.2f}%" if "acc1" in record else ""), flush=True)
            if perf:
                checkpoint(step / steps_per_epoch, None)
            elif t.epochs == 0:  # no training: evaluate the initial network (a baseline)
                knn = _knn(teacher.backbone, cfg, device, amp_dtype)
                checkpoint(0, knn[dc.knn_report_k][0])
            elif first_epoch >= t.epochs:
                # Resumed after the last epoch's checkpoint (killed before the results were
                # written): evaluate the final teacher, as the last epoch did.
                knn = _knn(teacher.backbone, cfg, device, amp_dtype)
        last_loss = parts.mean_loss(last_loss)  # every rank: an all-reduce
    except BaseException as err:
        end_failed_run(err, info.is_main, run_dir, log, step)

    fps = timed_images / timed_seconds if timed_seconds > 0 else None
    top1, top5 = knn[dc.knn_report_k] if knn else (None, None)
    bad = bad.over_ranks()  # a collective: every rank builds the results
    results = {
        "recipe": cfg.recipe, "Acc@1": top1, "Acc@5": top5,
        "eval": f"k-NN k={dc.knn_report_k}" if knn else None,
        "FPS": fps,  # original images per second (each gives 2 + local_crops_number crops)
        "FPS_per_device": fps / info.world_size if fps else None,
        "devices": info.world_size, "epochs": round(step / steps_per_epoch, 2), "precision": precision_name(amp_dtype),
        "torch": torch.__version__.split("+")[0], "mode": "perf" if perf else "full",
        "batch_size": d.batch_size, "crops_per_image": 2 + dc.local_crops_number, "steps": step,
        "ActualFPS": fps, "TrainingTime": 1000.0 * d.batch_size / fps if fps else None,  # ms per step
        "TrainAccuracy": top1, "ActualLoss": last_loss,
        "E2ETrainingTime": elapsed_before + time.perf_counter() - t0,  # all sessions of a resumed run
        "knn": {str(k): {"top1": a, "top5": b} for k, (a, b) in knn.items()} if knn else None,
        "skipped_steps": nonfinite,  # non-finite losses skipped (train.skip_nonfinite)
        "first_step_s": first_step_s,  # includes compilation with train.compile
        "ranks_in_sync": distributed.params_in_sync(student) and distributed.params_in_sync(teacher),
        "device": str(device), "run_dir": str(run_dir) if run_dir else None,
        "loader": loader_kind(loader), "cpu_fallbacks": cpu_fallbacks(loader, device),
        "bad_shards": failed_shards(loader),
        "bad_images": bad.count, "bad_images_per_split": {"train": bad.count}, "bad_image_names": {"train": bad.first()},
    }
    if info.is_main:
        log.close()
        table = write_results(run_dir, results)
        mark_status(run_dir, "finished")
        if bad.count:
            print(f"warning: {bad.count} unreadable image(s) were skipped: {describe('train', bad.count, bad.first())}",
                  flush=True)
        if not perf and t.epochs > 0:
            plot_curves(run_dir, f"{cfg.recipe} (DINO, k-NN accuracy; {precision_name(amp_dtype)}, {info.world_size} device(s))")
            if on_finished is not None:
                on_finished(run_dir)
        print("\n" + table + "\n" + (f"Final Performance images/sec : {fps:.2f}\n" if fps else "")
              + (f"Final k-NN Accuracy (k={dc.knn_report_k}) : {top1:.2f}\n" if knn else "")
              + f"E2E Training Duration sec : {results['E2ETrainingTime']:.0f}", flush=True)
        report_fallbacks(results["cpu_fallbacks"])
        if t.compile and first_step_s:
            print(f"torch.compile: the first step took {first_step_s:.1f} s (compilation included)", flush=True)
        log.finish(run_dir, results, "FINISHED")
    distributed.shutdown()
    return results


def _knn(backbone: nn.Module, cfg: RecipeConfig, device, amp_dtype) -> dict[int, tuple[float, float]]:
    """k-NN of the teacher backbone for dino.knn_k and dino.knn_report_k (every rank takes part)."""
    ks = sorted(set(cfg.dino.knn_k) | {cfg.dino.knn_report_k})
    res, _ = knn_eval(backbone, cfg.data, cfg.dino, device, amp_dtype, cfg.data.batch_size_per_device, ks)
    if distributed.from_env().is_main:
        print("k-NN: " + ", ".join(f"{k}-NN {a:.2f}%" for k, (a, _) in res.items()), flush=True)
    return res
