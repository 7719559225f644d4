"""What it takes to continue a run exactly: the training state a checkpoint holds, putting it
back, and finding the run that ``--resume auto`` means.

Exactness rests on three things: every random draw of the data pipeline is a function of
(seed, epoch, sample) (data/loading/samplers.py), so skipping the batches already seen reproduces the
rest of the epoch; the RNG streams of the training process itself (dropout, mixup, drop path)
are saved per rank and restored; and the optimizer, loss scaler, EMA and the running sums of
the current epoch are saved with the weights."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from visionzoo.errors import UserError
from visionzoo.run_folder import live_owner

RUN_FILES = ("config.yaml", "metrics.jsonl")
# Why a checkpoint is resumed only by as many processes as wrote it (an elastic resize is refused):
# the resolved config fixes the per-device batch (a resize would change the global batch, the LR
# and the steps per epoch the schedule is indexed by), and each rank's random streams and share
# of the epoch order are saved per rank.
RESIZE_WHY = ("its per-device batch, schedule, epoch split and random streams are per process, so "
              "another count cannot continue it exactly")


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG streams (Python, NumPy, torch CPU, and the device's)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # Plain values and tensors only, so the state loads with torch.load(weights_only=True).
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Put back what ``rng_state`` captured."""
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "device" in state:
        torch.cuda.set_rng_state(state["device"], device)


def _as_tuple(x: Any) -> Any:
    # weights_only loading gives lists where Python's random state needs tuples.
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def per_rank(value: Any) -> list[Any]:
    """``value`` from every rank (a list of one without a process group); a collective."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def truncate_metrics(run_dir: Path, global_step: int, epochs_done: int) -> None:
    """Drop the metrics.jsonl records written after the checkpoint being resumed from, so the
    file reads as if the run had never stopped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:  # a line cut short by the kill
            continue
        if r.get("kind") == "epoch" and r.get("epoch", 0) > epochs_done:
            continue
        if r.get("kind") in ("step", "resume") and r.get("step", 0) > global_step:
            continue
        kept.append(line)
    path.write_text("".join(f"{line}\n" for line in kept))


def _recipe_of(run: Path) -> str | None:
    """The recipe name a run folder's config.yaml records (None if it has none or is unreadable)."""
    import yaml

    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return cfg.get("recipe") if isinstance(cfg, dict) else None


def _last_written(run: Path) -> float:
    """When a run last wrote its state (status.json, else metrics.jsonl, else config.yaml)."""
    for name in ("status.json", "metrics.jsonl", "config.yaml"):
        try:
            return (run / name).stat().st_mtime
        except OSError:
            continue
    return run.stat().st_mtime


def find_auto_resume(recipe: str, output: str | None, root: str = "runs",
                     skipped: list[str] | None = None) -> Path | None:
    """``--resume auto``: ``output`` if it holds an unfinished run, else the unfinished run of
    this recipe under ``root`` (any folder name: the recipe is read from its config.yaml) that
    wrote its status last; None when there is nothing to resume. A run another process is
    training (run_folder.live_owner) is never chosen: it goes to ``skipped`` as "RUN (pid N on
    HOST)"; an ``output`` being trained is a UserError (two jobs must not train one folder)."""
    from visionzoo.checkpoint import checkpoint_pairs

    if output:
        owner = live_owner(Path(output))
        if owner is not None:
            raise UserError(f"--resume auto: {output} is being trained by another process ({owner}); "
                            "two jobs cannot train one run folder: wait for it, or stop it first")
        candidates = [Path(output)]
    else:
        base = Path(root)
        folders = [p for p in base.iterdir() if p.is_dir()] if base.is_dir() else []
        candidates = sorted((p for p in folders if _recipe_of(p) == recipe), key=_last_written, reverse=True)
    for run in candidates:
        if run.is_dir() and not (run / "results.json").exists() and checkpoint_pairs(run):
            owner = live_owner(run)
            if owner is None:
                return run
            if skipped is not None:
                skipped.append(f"{run} ({owner})")
    return None


def finished_results(run_dir: str | Path) -> dict | None:
    """The results of a run that has finished (results.json is written last, atomically), or
    None for a folder without them."""
    path = Path(run_dir).expanduser() / "results.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_new_run_dir(output: str | Path) -> None:
    """A new run may go into ``output`` unless that folder already holds a run's results or
    checkpoints: those are never overwritten by a run started without --resume."""
    out = Path(output).expanduser()
    if finished_results(out) is not None:
        raise UserError(f"--output {out} holds a finished run; choose another folder (or delete it)")
    from visionzoo.checkpoint import checkpoint_pairs

    owner = live_owner(out)
    if owner is not None:
        raise UserError(f"--output {out} is being trained by another process ({owner}); choose another folder")
    if checkpoint_pairs(out):
        raise UserError(f"--output {out} holds an unfinished run: continue it with --resume {out} "
                        "(or --resume auto), or choose another folder")


def check_resumable(run_dir: Path) -> Path:
    """A run folder given to ``--resume``: it must exist and hold a config and checkpoints."""
    from visionzoo.checkpoint import checkpoint_pairs

    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--resume {run_dir}: not a run folder (no config.yaml)")
    owner = live_owner(run_dir)
    if owner is not None:
        raise UserError(f"--resume {run_dir}: the run is being trained by another process ({owner}); two jobs "
                        "cannot train one run folder: wait for it, or stop it first")
    if not checkpoint_pairs(run_dir):
        raise UserError(f"--resume {run_dir}: the run has no checkpoint to continue from")
    return run_dir


@dataclass
class ResumePlan:
    """What ``--resume`` / ``resume=`` means for a training command: the config to run and the
    run folder to continue (None: a new run), or the results of a run that has finished
    (nothing to do), and what to tell the user."""

    cfg: Any
    resume_dir: Path | None = None
    finished: dict | None = None
    finished_dir: Path | None = None
    note: str | None = None


def plan_resume(cfg: Any, resume: str | Path | None, output: str | None,
                overrides: list[str] | None = None) -> ResumePlan:
    """Decide how a training command with ``resume`` (None, "auto" or a run folder) and
    ``output`` starts, for the CLI and the Python API alike.

    A finished run is left as it is (job scripts and cluster requeues pass --resume every time);
    ``auto`` continues ``output`` when it holds an unfinished run, else the newest unfinished run
    of the recipe under runs/; a run folder must hold a config and checkpoints; without resume,
    ``output`` must not hold a run. A resumed run runs its own config.yaml with ``overrides`` on
    top."""
    from visionzoo.config import load_config

    target = output if resume == "auto" else resume
    done = finished_results(target) if target else None
    if done is not None:
        return ResumePlan(cfg, finished=done, finished_dir=Path(target).expanduser(),
                          note=f"{target} has finished; nothing to resume")
    resume_dir, note = None, None
    if resume == "auto":
        skipped: list[str] = []
        resume_dir = find_auto_resume(cfg.recipe, output, skipped=skipped)
        where = output or "runs/"
        note = (f"--resume auto: continuing {resume_dir}, the newest unfinished {cfg.recipe} run in {where}"
                if resume_dir is not None else
                f"no unfinished {cfg.recipe} run in {where} to resume; starting a new one")
        if skipped:
            note += f" (skipped, still training: {', '.join(skipped)})"
    elif resume:
        resume_dir = check_resumable(Path(resume))
    elif output:
        check_new_run_dir(output)
    if resume_dir is not None:  # the run's own resolved config, with this command's overrides on top
        cfg = load_config(str(resume_dir / "config.yaml"), list(overrides or []))
    return ResumePlan(cfg, resume_dir, note=note)
