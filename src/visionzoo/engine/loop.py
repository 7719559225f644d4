"""The batch loop every task runs: an epoch (or part of one) of optimizer steps, with what every
step needs around the task's own computation.

For each loader item: the task prepares it on the device; unreadable images are counted; a
rank whose batch came out empty takes a zero-weight step in step with the others (lockstep.py);
the task computes the loss (forward under autocast); a non-finite loss is skipped on every rank
(``train.skip_nonfinite``) or counted on the device and caught at the next log point, checkpoint
or epoch end; the GradStep scales, back-propagates, clips and steps; the task does what follows
a step (EMA, teacher); then the step is timed, logged, checkpointed and the ranks vote on a stop
signal. The run (engine/run.py) calls ``train_epoch`` once per epoch, or ``timed_steps`` for a
performance run and ``visionzoo bench``."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from visionzoo import distributed
from visionzoo.engine import lockstep
from visionzoo.engine.bad_images import BadImages
from visionzoo.engine.stopping import Interrupted
from visionzoo.engine.tasks.base import Task
from visionzoo.progress import Progress
from visionzoo.runtime import synchronize


@dataclass(frozen=True)
class LoopSettings:
    """What the loop does around the steps (from cfg.train and cfg.log)."""

    accum_steps: int = 1
    log_every: int = 50  # optimizer steps between log points (0: none)
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints (0: epoch ends only)
    skip_nonfinite: int = 0  # steps with a NaN/inf loss that may be skipped before the run stops
    progress: str = "auto"  # auto | bar | lines | off
    show: bool = True  # this rank shows progress and writes log records (rank 0)

    @classmethod
    def of(cls, cfg: Any, is_main: bool) -> LoopSettings:
        t = cfg.train
        return cls(t.accum_steps, t.log_every, t.checkpoint_every_steps, t.skip_nonfinite, cfg.log.progress, is_main)


@dataclass
class Timer:
    """Training time and images over all ranks (the run's throughput), from the steps after a
    warm-up; the device is synchronised at each clock reading so the time is the device's."""

    images: int = 0
    seconds: float = 0.0
    started: float | None = None

    def start(self, device: torch.device) -> None:
        synchronize(device)
        self.started = time.perf_counter()

    def stop(self, device: torch.device) -> None:
        if self.started is not None:
            synchronize(device)
            self.seconds += time.perf_counter() - self.started
            self.started = None

    def total(self) -> tuple[int, float]:
        """(images, seconds) so far, the open interval included (no synchronisation)."""
        open_s = time.perf_counter() - self.started if self.started is not None else 0.0
        return self.images, self.seconds + open_s

    @property
    def rate(self) -> float | None:
        images, seconds = self.total()
        return images / seconds if seconds > 0 and images else None


@dataclass
class Position:
    """Where a run is and what it has counted: the mutable part of a run (a checkpoint saves it)."""

    epoch: int = 0  # epochs done = the epoch being trained, 0-based
    batches_in_epoch: int = 0  # loader items of this epoch consumed (a resume skips them)
    global_step: int = 0  # optimizer steps taken
    best_acc1: float = -math.inf
    last_loss: float = float("nan")
    nonfinite_skipped: int = 0  # steps dropped for a NaN/inf loss (train.skip_nonfinite)
    first_step_s: float | None = None  # wall time of this session's first step (compilation included)
    elapsed_before: float = 0.0  # wall time of the sessions before this one
    timer: Timer = field(default_factory=Timer)
    epoch_sums: torch.Tensor | None = None  # this rank's [loss x n, correct, n] of the current epoch
    bad: BadImages = field(default_factory=BadImages)  # this rank's distinct unreadable training images
    nonfinite: torch.Tensor | None = None  # device count of non-finite losses not yet checked

    def state(self) -> dict:
        """The shared fields a checkpoint holds (per-rank ones: ``rank_state``)."""
        images, seconds = self.timer.total()
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "global_step": self.global_step,
                "best_acc1": self.best_acc1, "last_loss": self.last_loss, "nonfinite": self.nonfinite_skipped,
                "timed": [images, seconds]}

    def rank_state(self) -> dict:
        sums = self.epoch_sums.cpu() if self.epoch_sums is not None else torch.zeros(3, dtype=torch.float64)
        return {"bad": self.bad.state(), "epoch_sums": sums}

    def load(self, state: dict, mine: dict, device: torch.device) -> None:
        """Continue from a checkpoint's ``state`` and this rank's entry ``mine`` of it."""
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.batches_in_epoch = int(state.get("batches_in_epoch", 0))
        self.best_acc1 = state.get("best_acc1", self.best_acc1)
        self.last_loss = state.get("last_loss", self.last_loss)
        self.nonfinite_skipped = int(state.get("nonfinite", 0))
        self.timer.images, self.timer.seconds = state.get("timed", (0, 0.0))
        self.elapsed_before = state.get("elapsed_s", 0.0)
        # This rank's unreadable images (a checkpoint from before names were kept: its count, unnamed).
        self.bad.load(mine.get("bad", {"names": [], "unnamed": mine.get("bad_images", 0)}))
        sums = mine.get("epoch_sums")
        if sums is not None and self.batches_in_epoch:
            self.epoch_sums = _as_sums(sums).to(device)


def _as_sums(sums: Any) -> torch.Tensor:
    """[loss x n, correct, n] from a checkpoint (DINO's older (loss sum, n, steps) had no correct count)."""
    t = torch.as_tensor(sums, dtype=torch.float64).flatten()
    return t if len(t) == 3 else torch.zeros(3, dtype=torch.float64)


@dataclass
class EpochStats:
    loss: float = float("nan")
    acc1: float | None = None  # on the training batches (hard labels, before mixing); None: no labels
    steps: int = 0
    images: int = 0  # this session, this rank


class RunHooks:
    """What the loop asks of the run: a checkpoint of the current position, a log record, and the
    stop vote. The defaults do nothing (``visionzoo bench``)."""

    checkpoints = False  # mid-epoch checkpoints and stop votes happen

    def checkpoint(self) -> None:
        pass

    def vote(self) -> tuple[int, int | None]:
        """(stop code agreed by the ranks, this rank's signal)."""
        return 0, None

    def log(self, **record: Any) -> None:
        pass


def check_finite(task: Task, pos: Position) -> None:
    """Stop with one line if a non-finite loss went by since the last check (a sync, on every rank)."""
    flag = pos.nonfinite.clone() if pos.nonfinite is not None else torch.zeros((), device=task.env.device)
    if bool(distributed.all_reduce_sum(flag) > 0):
        _diverged(pos)


def _diverged(pos: Position) -> None:
    """Every rank has read the same all-reduced count and ends with the same line."""
    distributed.raise_agreed(f"the loss became NaN/inf by epoch {pos.epoch + 1}, step {pos.global_step}: "
                             "training diverged; the last good checkpoint is kept. Try a lower optim.lr, "
                             "train.amp=bf16 or none, a longer schedule.warmup_epochs, or let "
                             "train.skip_nonfinite=N steps be skipped")


def _skip_nonfinite(task: Task, pos: Position, s: LoopSettings, loss: torch.Tensor) -> bool:
    """With train.skip_nonfinite > 0: whether this step's loss is NaN/inf on any rank (one sync per
    step, the price of skipping exactly the bad steps); the step is then dropped everywhere."""
    finite = torch.isfinite(loss.detach()).float()
    if bool(distributed.all_reduce_sum(finite) == distributed.world_size()):
        return False
    pos.nonfinite_skipped += 1
    task.step.optimizer.zero_grad(set_to_none=True)
    if pos.nonfinite_skipped > s.skip_nonfinite:
        distributed.raise_agreed(f"{pos.nonfinite_skipped} steps had a NaN/inf loss by epoch {pos.epoch + 1}, "
                                 f"step {pos.global_step} (train.skip_nonfinite={s.skip_nonfinite}): training "
                                 "diverged; the last good checkpoint is kept. Try a lower optim.lr or "
                                 "train.amp=bf16/none")
    return True


def _count_nonfinite(task: Task, pos: Position, loss: torch.Tensor) -> None:
    """Count a non-finite loss on the device (read at the next check); fp16's loss scaler skips
    such steps itself."""
    if task.step.skips_nonfinite:
        return
    bad = (~torch.isfinite(loss.detach())).float()
    pos.nonfinite = bad if pos.nonfinite is None else pos.nonfinite + bad


def _log_point(task: Task, pos: Position, s: LoopSettings, hooks: RunHooks, loss: torch.Tensor,
               values: dict, progress: Progress) -> None:
    """Every log_every steps and at the first: the host reads the loss averaged over the ranks and
    the non-finite count, in one read (one all-reduce), and stops if the loss diverged."""
    flag = pos.nonfinite if pos.nonfinite is not None else torch.zeros((), device=loss.device)
    loss_sum, bad = distributed.all_reduce_sum(torch.stack([loss.detach().float(), flag.float()])).tolist()
    if bad > 0:
        _diverged(pos)
    pos.last_loss = loss_sum / distributed.world_size()
    rate = pos.timer.rate
    if s.show:
        hooks.log(kind="step", epoch=pos.epoch + 1, step=pos.global_step, loss=pos.last_loss, **values, img_s=rate)
        progress.update(loss=pos.last_loss, lr=values.get("lr"), **{"img/s": rate})


def _after_step(task: Task, pos: Position, s: LoopSettings, hooks: RunHooks, state: dict) -> None:
    """Log point, mid-epoch checkpoint and stop vote after optimizer step ``pos.global_step``."""
    if s.log_every > 0 and (pos.global_step % s.log_every == 0 or pos.global_step == 1):
        _log_point(task, pos, s, hooks, state["loss"], state["values"], state["progress"])
    if hooks.checkpoints and state["done"] < state["total"]:
        if s.checkpoint_every and pos.global_step % s.checkpoint_every == 0:
            hooks.checkpoint()
        if pos.global_step % state["vote_every"] == 0:
            code, signum = hooks.vote()
            if code:
                hooks.checkpoint()
                raise Interrupted(code, signum)


def _step_batch(task: Task, pos: Position, s: LoopSettings, batch: Any, state: dict) -> bool:
    """One micro-batch through the task and the GradStep; whether it completed an optimizer step."""
    update = pos.batches_in_epoch % s.accum_steps == 0
    if update:
        state["values"] = task.set_step(pos.global_step, pos.epoch)
    with task.accumulate(update):
        if batch.n:
            loss, correct = task.loss(batch, (pos.batches_in_epoch - 1) % s.accum_steps)
        else:  # no usable image on this rank: a zero-weight step, in step with the other ranks
            loss, correct = task.placeholder_loss(), None
    if s.skip_nonfinite > 0 and _skip_nonfinite(task, pos, s, loss):
        return False
    _count_nonfinite(task, pos, loss)
    task.step(loss / s.accum_steps, update=update)
    if batch.n:
        state["sums"] += torch.stack([
            torch.nan_to_num(loss.detach().double()) * batch.n,
            correct.double() if correct is not None else torch.zeros((), dtype=torch.float64, device=loss.device),
            torch.full((), batch.n, dtype=torch.float64, device=loss.device),  # a fill kernel, not a copy
        ])
        state["labelled"] = state["labelled"] or correct is not None
    state["loss"] = loss
    return update


def train_epoch(task: Task, pos: Position, s: LoopSettings, hooks: RunHooks, max_steps: int = 0,
                time_after: int = 0) -> EpochStats:
    """Train on the rest of epoch ``pos.epoch`` (at most ``max_steps`` optimizer steps in the epoch
    when > 0). Throughput is timed from this call's optimizer step ``time_after`` on (0: from the
    start), so warm-up (cuDNN autotuning, compilation, worker start-up) is left out."""
    device, loader = task.env.device, task.train_loader
    task.train()
    if pos.epoch_sums is None:
        pos.epoch_sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss x n, correct, n
    accum, stats, t_called = s.accum_steps, EpochStats(), time.perf_counter()
    done = pos.batches_in_epoch // accum  # optimizer steps already taken in this epoch
    total = min(len(loader) // accum + done, max_steps) if max_steps else len(loader) // accum + done
    progress = Progress(loader, total * accum, f"epoch {pos.epoch + 1}", s.progress, start=done * accum,
                        enabled=s.show)
    state = {"sums": pos.epoch_sums, "labelled": False, "values": {}, "loss": None, "progress": progress,
             "done": done, "total": total, "vote_every": 10 if distributed.world_size() > 1 else 1}
    if time_after == 0:
        pos.timer.start(device)
    for item in progress:
        if state["done"] >= total:
            break
        batch = task.prepare(item)
        if batch.n_bad:
            pos.bad.add(batch.n_bad)
        pos.batches_in_epoch += 1
        if batch.n == 0 and not lockstep.must_step_empty():
            continue  # one process: nothing to match, nothing to learn from
        stats.images += batch.n
        if pos.timer.started is not None:
            pos.timer.images += batch.n * distributed.world_size()
        if not _step_batch(task, pos, s, batch, state):
            continue
        task.after_update(batch)
        pos.global_step, state["done"], stats.steps = pos.global_step + 1, state["done"] + 1, stats.steps + 1
        if pos.first_step_s is None:  # one sync per run: how long compiling (or warming up) took
            synchronize(device)
            pos.first_step_s = time.perf_counter() - t_called
        if stats.steps == time_after:
            pos.timer.start(device)
        _after_step(task, pos, s, hooks, state)
    progress.close()
    pos.timer.stop(device)
    loss_sum, correct, count = distributed.all_reduce_sum(state["sums"].clone()).tolist()
    if count > 0:
        stats.loss, pos.last_loss = loss_sum / count, loss_sum / count
        stats.acc1 = 100.0 * correct / count if state["labelled"] else None
    return stats


def timed_steps(task: Task, pos: Position, s: LoopSettings, hooks: RunHooks, until_step: int,
                time_from_step: int, set_epoch: Callable[[Any, int, int], None]) -> None:
    """Train until ``pos.global_step == until_step`` (over as many passes of the loader as that
    takes), timing the steps after ``time_from_step`` into ``pos.timer``: a performance run."""
    while pos.global_step < until_step:
        set_epoch(task.train_loader, pos.epoch, 0)
        train_epoch(task, pos, s, hooks, max_steps=until_step - pos.global_step,
                    time_after=max(time_from_step - pos.global_step, 0))
        pos.epoch, pos.batches_in_epoch, pos.epoch_sums = pos.epoch + 1, 0, None
        task.end_epoch()
