"""Stopping a run on a signal: all ranks agree at a step boundary, write a checkpoint, and exit
with one line saying how to continue (and, on Slurm's early-warning SIGUSR1, requeue the job).

``runtime.StopSignal`` turns the signals into a code (0: none, ``STOP``: SIGTERM/SIGINT,
``REQUEUE``: SIGUSR1). On several ranks the codes are combined by ``StopVote``: an all-reduce
(MAX) started every ``every`` steps and read one vote later, so no step waits for it (on a GPU,
reading a reduced flag at once would stall the host on the step's kernels)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import torch
import torch.distributed as dist

from visionzoo.errors import Stopped
from visionzoo.run_folder import MetricsLog, mark_status
from visionzoo.runtime import REQUEUE, STOP


class Interrupted(Exception):
    """A stop signal was agreed on by every rank; a checkpoint of the current step has been written."""

    def __init__(self, code: int = STOP, signum: int | None = None) -> None:
        # The signal the exit code reports: SIGUSR1 for a requeue, else this rank's own (a rank
        # that got none stops because another did: SIGTERM).
        signum = signal.SIGUSR1 if code == REQUEUE else signum or signal.SIGTERM
        super().__init__(signal.Signals(signum).name)
        self.code, self.signum = code, int(signum)


class StopVote:
    """Whether any rank was asked to stop, agreed on by all ranks without a device stall.

    ``vote(code)`` is called by every rank at the same steps; it returns the largest code any
    rank handed to the previous call (one call later than a blocking vote), or with one
    process the code itself."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pending: tuple | None = None  # (work, device flag, host copy, event)

    def vote(self, code: int) -> int:
        if not dist.is_initialized():
            return code
        agreed = self._read()
        flag = torch.full((), float(code), device=self.device)  # a fill kernel, no host→device copy
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        host, event = flag, None
        if self.device.type != "cpu":
            work.wait()  # orders the reduction before the copy on the current stream; does not block the host
            host = torch.empty((), pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.Event(self.device.type)
            event.record()
            work = None
        self._pending = (work, host, event)
        return agreed

    def _read(self) -> int:
        if self._pending is None:
            return 0
        work, host, event = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        if event is not None:
            event.synchronize()  # queued a whole check interval ago: long done
        return int(host.item())

    def close(self) -> None:
        """Finish a vote still in flight (every rank calls it at the same point)."""
        self._read()


def requeue_slurm_job() -> str | None:
    """``scontrol requeue $SLURM_JOB_ID`` (the job goes back to the queue and restarts its
    script, which resumes with ``--resume``). Returns a note for the stop line, or None outside
    Slurm."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    exe = shutil.which("scontrol")
    if exe is None:
        return f"could not requeue Slurm job {job}: scontrol is not on PATH"
    try:
        proc = subprocess.run([exe, "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"could not requeue Slurm job {job}: {err}"
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        return f"could not requeue Slurm job {job}: scontrol said {why[0] if why else f'exit {proc.returncode}'}"
    return f"Slurm job {job} requeued"


def end_failed_run(err: BaseException, is_main: bool, run_dir: Path | None, log: MetricsLog | None, step: int) -> None:
    """Record why a run ended early (status interrupted or failed, on rank 0) and re-raise: a
    stop signal becomes ``errors.Stopped`` (one line naming the checkpoint; rank 0 requeues the
    Slurm job after SIGUSR1)."""
    stopped = isinstance(err, Interrupted)
    if is_main:
        if stopped:
            mark_status(run_dir, "interrupted", step=step, signal=signal.Signals(err.signum).name)
        elif isinstance(err, KeyboardInterrupt):  # Ctrl-C twice: stopped at once, the last checkpoint is older
            mark_status(run_dir, "interrupted", step=step, signal="SIGINT", checkpoint="the previous one")
        else:
            mark_status(run_dir, "failed", error=f"{type(err).__name__}: {err}"[:500])
        log.close()
        log.finish(run_dir, None, "KILLED" if stopped or isinstance(err, KeyboardInterrupt) else "FAILED")
    if not stopped:
        raise err
    note = requeue_slurm_job() if is_main and err.code == REQUEUE else None
    raise Stopped(step, run_dir, err.signum, note, quiet=not is_main) from None
