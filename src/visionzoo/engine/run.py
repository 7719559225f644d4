"""One run lifecycle for every training task, and for ``visionzoo bench``.

``fit`` takes a resolved config through: device and process group (``start_env``), the task's
set-up (engine/tasks/), resume from the newest checkpoint, the run folder with config.yaml,
metrics.jsonl, trackers and status.json, the epochs (engine/loop.py) with evaluation, checkpoints
and the stop vote, or a performance run's timed steps, then results.json, the curves and the
finish. A task never writes a file of the run folder; this module writes all of them."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from visionzoo import distributed
from visionzoo.checkpoint import BEST, WEIGHTS, load_latest, publish, save_checkpoint
from visionzoo.config import RecipeConfig, to_yaml
from visionzoo.curves import curves_title, plot_curves
from visionzoo.data.loading.build import (
    check_data_path,
    cpu_fallbacks,
    failed_shards,
    loader_kind,
    loader_workers,
    set_loader_epoch,
)
from visionzoo.engine.bad_images import describe
from visionzoo.engine.loop import LoopSettings, Position, RunHooks, check_finite, timed_steps, train_epoch
from visionzoo.engine.resume import RESIZE_WHY, per_rank, rng_state, set_rng_state, truncate_metrics
from visionzoo.engine.stopping import StopVote, end_failed_run
from visionzoo.engine.tasks import check_config, make_task
from visionzoo.engine.tasks.base import Evaluation, RunEnv, Task
from visionzoo.errors import UserError
from visionzoo.run_folder import (
    MetricsLog,
    RunLock,
    live_owner,
    mark_status,
    new_run_dir,
    report_fallbacks,
    write_results,
)
from visionzoo.runtime import (
    StopSignal,
    busy_elsewhere,
    configure_determinism,
    cpu_threads,
    precision_label,
    precision_name,
    resolve_amp,
    resolve_device,
    seed_everything,
    weights_dtype,
)


def start_env(cfg: RecipeConfig, amp_dtype: Any = "config") -> tuple[RecipeConfig, RunEnv]:
    """``cfg`` as it runs on this job's ranks (tasks.check_config: for_world_size and the task's
    checks), and where it runs: the device made current, the process group joined, every RNG
    seeded (seed + rank), the precision resolved (``amp_dtype``: a dtype or None instead of
    train.amp's choice, for bench)."""
    info = distributed.from_env()
    configure_determinism(cfg.train.deterministic, cfg.train.cudnn_benchmark)  # before CUDA initialises
    device = resolve_device(cfg.train.device, info.local_rank)
    # Each rank says a refusal here itself: ranks start seconds apart, and one that exited first
    # in silence could have the launcher (or srun --kill-on-bad-exit) stop rank 0 before it spoke.
    cfg = check_config(cfg, info.world_size, device.type)
    distributed.init(info, device, cfg.train.dist_timeout)  # makes `device` current first
    seed_everything(cfg.train.seed + info.rank)
    amp = resolve_amp(cfg.train.amp, device) if amp_dtype == "config" else amp_dtype
    return cfg, RunEnv(device, amp, info.rank, info.world_size, info.enabled)


def launch(cfg: RecipeConfig, devices: int, argv: list[str]) -> int:
    """``visionzoo ARGV`` in ``devices`` worker processes on this machine
    (distributed.launch_local; returns its exit code), once the data path and the config have
    passed the checks each worker would make: a mistake there is said once, before any starts."""
    check_data_path(cfg.data)
    check_config(cfg, devices, resolve_device(cfg.train.device).type)
    return distributed.launch_local(devices, argv)


def _precision(cfg: RecipeConfig, env: RunEnv) -> str:
    return precision_name(env.amp_dtype or weights_dtype(cfg.train.amp))


class RunFolder:
    """The run folder on rank 0: config.yaml, metrics.jsonl (+ TensorBoard, trackers), status.json."""

    def __init__(self, cfg: RecipeConfig, resume_dir: Path | None, pos: Position) -> None:
        self.path = Path(resume_dir) if resume_dir is not None else new_run_dir(cfg.recipe, cfg.output)
        self.lock = RunLock(self.path)
        if not self.lock.acquire():  # checked before, but two jobs may have started at once
            owner = live_owner(self.path) or "its lock is held"
            raise UserError(f"{self.path} is being trained by another process ({owner}); "
                            "two jobs cannot train one run folder")
        if resume_dir is not None:
            truncate_metrics(self.path, pos.global_step, pos.epoch)
        (self.path / "config.yaml").write_text(to_yaml(cfg))
        self.log = MetricsLog(self.path / "metrics.jsonl", self.path / "tensorboard" if cfg.log.tensorboard else None,
                              resumed_at=pos.global_step if resume_dir is not None else None)
        if cfg.log.mlflow or cfg.log.mlflow_uri or cfg.log.wandb:
            from visionzoo.trackers import open_trackers

            self.log.trackers = open_trackers(cfg, self.path)
        mark_status(self.path, "running")


class Run(RunHooks):
    """A task being trained: its position, folder and the hooks the batch loop calls."""

    checkpoints = True

    def __init__(self, cfg: RecipeConfig, env: RunEnv, task: Task, pos: Position, folder: RunFolder | None,
                 t0: float) -> None:
        self.cfg, self.env, self.task, self.pos, self.folder, self.t0 = cfg, env, task, pos, folder, t0
        self.settings = LoopSettings.of(cfg, env.is_main)
        self.stop: StopSignal | None = None
        self.voter = StopVote(env.device)
        self.summary = True  # print the results table and the seeds' "Final ..." lines at the end

    # --- RunHooks ----------------------------------------------------------------------------
    def checkpoint(self, acc1: float | None = None) -> None:
        """Write the current position (a collective: every rank calls it at the same step)."""
        w = self.task.weights()
        check_finite(self.task, self.pos)
        _check_weights(w.module, w.ema)  # never save weights that went through a NaN step
        pos = self.pos
        state = {**pos.state(), "elapsed_s": pos.elapsed_before + time.perf_counter() - self.t0,
                 "task": self.task.state_dict(),
                 "ranks": per_rank({"rng": rng_state(self.env.device), **pos.rank_state(),
                                    "threads": torch.get_num_threads() if self.env.device.type == "cpu" else None})}
        if self.folder is not None:
            save_checkpoint(self.folder.path, pos.global_step, w.module, {**w.meta, "epoch": pos.epoch, "acc1": acc1},
                            state, self.cfg.train.keep_checkpoints, w.ema)

    def vote(self) -> tuple[int, int | None]:
        return self.voter.vote(self.stop.code), self.stop.signum

    def log(self, **record: Any) -> None:
        if self.folder is not None:
            self.folder.log.write(**record)

    # --- the run -----------------------------------------------------------------------------
    def epochs(self) -> Evaluation | None:
        """The epochs of a full run (train, evaluate, checkpoint); the last evaluation or None."""
        t, pos, first_epoch, last_eval = self.cfg.train, self.pos, self.pos.epoch, None
        if t.epochs == 0 and pos.global_step == 0:  # no training: the initial network, evaluated (a baseline)
            last_eval = self.task.evaluate()
            self.checkpoint(last_eval.acc1 if last_eval else None)
            return last_eval
        for epoch in range(first_epoch, t.epochs):
            evaluated = self._epoch(epoch, first_epoch)
            last_eval = evaluated or last_eval
        if last_eval is None and first_epoch >= t.epochs > 0:
            # Resumed after the last epoch's checkpoint (killed before the results were
            # written): the final weights are there; evaluate them, as the last epoch did.
            last_eval = self.task.evaluate()
        return last_eval

    def _epoch(self, epoch: int, first_epoch: int) -> Evaluation | None:
        """One epoch: train, evaluate when due, record, checkpoint; the evaluation or None."""
        t, pos, task, env = self.cfg.train, self.pos, self.task, self.env
        set_loader_epoch(task.train_loader, epoch, pos.batches_in_epoch)
        t_epoch, (images0, seconds0) = time.perf_counter(), pos.timer.total()
        warm = min(t.perf_warmup_steps, task.steps_per_epoch // 2) if epoch == first_epoch else 0
        stats = train_epoch(task, pos, self.settings, self, max_steps=task.steps_per_epoch, time_after=warm)
        check_finite(task, pos)
        task.end_epoch()
        images1, seconds1 = pos.timer.total()
        record = dict(kind="epoch", epoch=epoch + 1, step=pos.global_step, train_loss=stats.loss,
                      **({"train_acc1": stats.acc1} if stats.acc1 is not None else {}),
                      lr=float(task.step.optimizer.param_groups[0]["lr"]),
                      img_s=(images1 - images0) / (seconds1 - seconds0) if seconds1 > seconds0 else float("nan"),
                      **task.epoch_metrics())
        evaluated = None
        if epoch + 1 == t.epochs or (t.eval_every > 0 and (epoch + 1) % t.eval_every == 0):
            evaluated = task.evaluate()
            if evaluated is not None:
                record.update(acc1=evaluated.acc1, acc5=evaluated.acc5, **evaluated.record)
        record["epoch_time"] = time.perf_counter() - t_epoch
        pos.epoch, pos.batches_in_epoch, pos.epoch_sums = epoch + 1, 0, None
        improved = record.get("acc1") is not None and record["acc1"] > pos.best_acc1
        if improved:
            pos.best_acc1 = record["acc1"]
        self.log(**record)  # before the checkpoint: a resume from it then finds the epoch's record
        self.checkpoint(record.get("acc1"))
        if env.is_main:
            print(self._epoch_line(record, stats), flush=True)
            warning = task.epoch_warning(record)
            if warning:
                print(f"warning: {warning}", flush=True)
            if improved:  # model.safetensors: the measured model (the EMA when there is one)
                publish(self.folder.path / WEIGHTS, self.folder.path / BEST)
        return evaluated

    def _epoch_line(self, record: dict, stats: Any) -> str:
        devices = f" ({self.env.world_size} devices)" if self.env.ddp else ""
        line = (f"epoch {record['epoch']}/{self.cfg.train.epochs}: train loss {record['train_loss']:.4f}"
                + (f" acc {stats.acc1:.2f}%" if stats.acc1 is not None else "") + f" | {record['img_s']:.0f} img/s"
                + devices)
        return line + (f" | {self.task.describe_eval(record)}" if "acc1" in record else "")

    def perf(self) -> None:
        """A performance run: warm-up steps, then timed steps; a checkpoint at the end."""
        t, start = self.cfg.train, self.pos.global_step
        timed_steps(self.task, self.pos, self.settings, self, start + t.perf_warmup_steps + t.perf_steps,
                    start + t.perf_warmup_steps, set_loader_epoch)
        self.checkpoint()

    def results(self, perf: bool, last_eval: Evaluation | None) -> dict:
        """results.json: the seed-style row plus the figures the seeds' scripts print (a
        collective: every rank builds it)."""
        cfg, env, pos, task = self.cfg, self.env, self.pos, self.task
        images, seconds = pos.timer.total()
        fps = images / seconds if seconds > 0 and images else None
        train_bad, val = pos.bad.over_ranks(), last_eval or Evaluation(None)
        acc1 = val.acc1
        results = {
            "recipe": cfg.recipe, "Acc@1": acc1, "Acc@5": val.acc5, "FPS": fps,
            "FPS_per_device": fps / env.world_size if fps else None, "devices": env.world_size,
            "epochs": round(pos.global_step / task.steps_per_epoch, 2) if perf else pos.epoch,
            "precision": _precision(cfg, env), "torch": torch.__version__.split("+")[0],
            "mode": "perf" if perf else "full", "batch_size": cfg.data.batch_size, "steps": pos.global_step,
            "ActualFPS": fps, "TrainingTime": 1000.0 * cfg.data.batch_size / fps if fps else None,  # ms per step
            "TrainAccuracy": acc1,  # the seeds' name for the final Acc@1
            "ActualLoss": pos.last_loss,
            "E2ETrainingTime": pos.elapsed_before + time.perf_counter() - self.t0,  # all sessions of a resumed run
            # Distinct images (each counted once, whatever the epochs) over all ranks, per split, the first few named.
            "bad_images": train_bad.count + val.bad_images,
            "bad_images_per_split": {"train": train_bad.count, "val": val.bad_images},
            "bad_image_names": {"train": train_bad.first(), "val": val.bad_names},
            "skipped_steps": task.step.skipped + pos.nonfinite_skipped,
            "first_step_s": pos.first_step_s,  # includes compilation with train.compile
            "ranks_in_sync": task.in_sync(),
            "device": str(env.device), "run_dir": str(self.folder.path) if self.folder else None,
            "loader": loader_kind(task.train_loader), "cpu_fallbacks": cpu_fallbacks(task.train_loader, env.device),
            "bad_shards": failed_shards(*task.loaders()),
        }
        results.update(task.results(last_eval))
        return results

    def finish(self, results: dict, perf: bool, on_finished: Callable[[Path], None] | None) -> None:
        """Rank 0: results.json and results.md, status, curves, the report hook, the final lines."""
        folder, env, task = self.folder, self.env, self.task
        folder.log.close()
        table = write_results(folder.path, results)
        mark_status(folder.path, "finished")
        if not perf and self.cfg.train.epochs > 0:
            plot_curves(folder.path, curves_title(self.cfg.recipe, _precision(self.cfg, env), env.world_size,
                                                  self.cfg.task))
            if on_finished is not None:
                on_finished(folder.path)
        fps = results["FPS"]
        per_device = f" ({fps / env.world_size:.2f} per device)" if fps and env.ddp else ""
        if self.summary:  # the CLI's end; the Python API returns the table instead (api.Run)
            print(("\n" + table + "\n") + (f"Final Performance images/sec : {fps:.2f}{per_device}\n" if fps else "")
                  + (f"Final {task.accuracy_label} : {results['Acc@1']:.2f}\n" if results["Acc@1"] is not None
                     else "") + f"E2E Training Duration sec : {results['E2ETrainingTime']:.0f}", flush=True)
        if results["bad_images"]:
            parts = [describe(split, n, results["bad_image_names"][split])
                     for split, n in results["bad_images_per_split"].items() if n]
            print(f"warning: {results['bad_images']} unreadable image(s) were skipped: {'; '.join(parts)}", flush=True)
        report_fallbacks(results["cpu_fallbacks"])
        if self.cfg.train.compile and self.pos.first_step_s:
            print(f"torch.compile: the first step took {self.pos.first_step_s:.1f} s (compilation included)",
                  flush=True)
        folder.log.finish(folder.path, results, "FINISHED")


def _check_weights(*modules: torch.nn.Module | None) -> None:
    """Stop with one line if a weight or buffer is no longer finite (one sync, on every rank)."""
    tensors = [t for m in modules if m is not None for t in m.state_dict().values() if t.is_floating_point()]
    if not tensors:
        return
    flag = torch.stack([(~torch.isfinite(t)).any() for t in tensors]).float().sum()
    if bool(distributed.all_reduce_sum(flag) > 0):
        distributed.raise_agreed("the weights became NaN/inf; the last good checkpoint is kept. Lower optim.lr, "
                                 "use train.amp=bf16/none, or let train.skip_nonfinite=N steps be skipped")


def _resume(task: Task, pos: Position, resume_dir: Path, env: RunEnv) -> tuple[dict, Path]:
    """Load the newest usable checkpoint of ``resume_dir`` into the task and the position (the
    RNG streams come last, once the set-up is done drawing). Returns (state, weights file)."""
    tensors, state, weights_path = load_latest(resume_dir)
    if len(state["ranks"]) != env.world_size:
        raise UserError(f"{weights_path} was written by {len(state['ranks'])} process(es), this run has "
                        f"{env.world_size}: {RESIZE_WHY}; resume with --devices {len(state['ranks'])}")
    own = dict(state.get("task", state))  # older checkpoints kept the task's entries at the top level
    if "ema_weights" in state:  # the EMA weights file of the pair
        own["ema_weights"] = state["ema_weights"]
    task.load_state_dict(own, tensors)
    pos.load(state, state["ranks"][env.rank], env.device)
    return state, weights_path


def _header(cfg: RecipeConfig, env: RunEnv, task: Task, perf: bool, folder: RunFolder, resumed: Path | None,
            pos: Position, threads: str | None) -> str:
    what, batch = task.header()
    verb = task.title.replace("training", "perf run") if perf else task.title
    where = (f"resuming {folder.path} at epoch {pos.epoch + 1}, step {pos.global_step} ({resumed.name})"
             if resumed is not None else f"run folder {folder.path}")
    return (f"visionzoo: {verb} {cfg.recipe} | {what} | {env.world_size} × {env.device} "
            f"{precision_label(env.amp_dtype or weights_dtype(cfg.train.amp), env.device)}"
            + (f", {threads}" if threads else "") + f" | {batch} | {where}")


def _local_ranks() -> int:
    """The ranks of this job on this machine (torchrun's and visionzoo's launcher's LOCAL_WORLD_SIZE,
    Slurm's tasks per node: "2" or "2(x3)")."""
    value = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or "1"
    digits = re.match(r"\d+", value)
    return int(digits.group()) if digits else 1


def set_cpu_threads(env: RunEnv, task: Task) -> str | None:
    """On the CPU: intra-op threads by runtime.cpu_threads (a thread per core on an idle machine,
    fewer beside other processes' load, loader workers and other ranks), said in the run header;
    None on an accelerator."""
    if env.device.type != "cpu":
        return None
    ranks = _local_ranks()
    # Only a rank alone can tell other processes' load from its own job's (the other ranks).
    probe = ranks == 1 and not os.environ.get("OMP_NUM_THREADS")
    n, why = cpu_threads(loader_workers(task.train_loader), ranks, elsewhere=busy_elsewhere() if probe else None)
    torch.set_num_threads(n)
    return _threads_text(n, why)


def _threads_text(n: int, why: str) -> str:
    return f"{n} thread{'s' if n != 1 else ''} ({why})"


def _resumed_threads(state: dict, env: RunEnv, threads: str | None) -> str | None:
    """A resumed CPU run keeps the thread count its checkpoint was written with: the count
    changes the round-off, and the load that chose it may differ now. OMP_NUM_THREADS wins."""
    recorded = state["ranks"][env.rank].get("threads")
    if env.device.type != "cpu" or not recorded or os.environ.get("OMP_NUM_THREADS"):
        return threads
    torch.set_num_threads(int(recorded))
    return _threads_text(int(recorded), "as before the resume")


def fit(cfg: RecipeConfig, perf: bool = False, resume_dir: Path | None = None,
        on_finished: Callable[[Path], None] | None = None, summary: bool = True) -> dict:
    """Train ``cfg`` with its task (or time it, with ``perf``) and write the run folder; with
    ``resume_dir``, continue that run from its newest usable checkpoint. ``on_finished(run_dir)``
    runs on rank 0 after a full run's results are written and before the trackers close (the CLI
    and the API write the report page there); ``summary``: print the results table and the
    seeds' "Final ..." lines at the end. Returns results.json's dict."""
    t0 = time.perf_counter()
    cfg, env = start_env(cfg)
    task = make_task(cfg, env)
    task.setup()
    before = torch.get_num_threads()
    try:
        threads = set_cpu_threads(env, task)
        return _fit(cfg, env, task, FitRequest(perf, resume_dir, on_finished, summary), t0, threads)
    finally:
        torch.set_num_threads(before)  # a Python caller's own setting, back after the run


@dataclass(frozen=True)
class FitRequest:
    """What the caller of ``fit`` asked for."""

    perf: bool = False
    resume_dir: Path | None = None
    on_finished: Callable[[Path], None] | None = None
    summary: bool = True


def _fit(cfg: RecipeConfig, env: RunEnv, task: Task, req: FitRequest, t0: float, threads: str | None) -> dict:
    """``fit`` once the task is set up: resume, the run folder, the run, the finish."""
    perf, resume_dir, on_finished = req.perf, req.resume_dir, req.on_finished
    pos, state, resumed = Position(), None, None
    if resume_dir is not None:
        state, resumed = _resume(task, pos, resume_dir, env)
        threads = _resumed_threads(state, env, threads)
    task.wrap(resumed is not None)
    # Rank 0 writes the folder; a failure there (a read-only folder, a run another job holds)
    # ends every rank at once instead of leaving them waiting in their first collective.
    folder = distributed.on_main_rank(lambda: RunFolder(cfg, resume_dir, pos), "cannot write the run folder")
    try:
        if env.is_main:
            print(_header(cfg, env, task, perf, folder, resumed, pos, threads), flush=True)
        if state is not None:
            set_rng_state(state["ranks"][env.rank]["rng"], env.device)  # last: the set-up drew from the RNGs
        run = Run(cfg, env, task, pos, folder, t0)
        run.summary = req.summary
        results = _train(run, perf, on_finished)
    except UserError as err:
        if err.agreed:
            # Every rank met this together (a stop after its checkpoint, an all-reduced NaN), and
            # rank 0 has recorded it: leave the group as a finished run does. A rank that exited
            # at once could abort in interpreter shutdown ("terminate called ..." after the line,
            # distributed.shutdown), or have the launcher stop rank 0 before it said why.
            distributed.shutdown()
        raise
    finally:
        if folder is not None:
            folder.lock.release()
    distributed.shutdown()
    return results


def _train(run: Run, perf: bool, on_finished: Callable[[Path], None] | None) -> dict:
    """The run's epochs (or timed steps), then results and the finish; a stop or an error is
    recorded in the run folder and raised (engine/stopping.py)."""
    folder, last_eval = run.folder, None
    try:
        with StopSignal() as run.stop:
            if perf:
                run.perf()
            else:
                last_eval = run.epochs()
    except BaseException as err:
        end_failed_run(err, run.env.is_main, folder.path if folder else None, folder.log if folder else None,
                       run.pos.global_step)
    results = run.results(perf, last_eval)
    if run.env.is_main:
        run.finish(results, perf, on_finished)
    return results
