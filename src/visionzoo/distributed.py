"""Process-group set-up and reductions on torch.distributed.

A run always knows its rank and world size; with one process there is no process group and
the reductions are identities, so the engines have a single code path."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import re
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist

from visionzoo.errors import UserError
from visionzoo.runtime import select_device

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env() -> DistInfo:
    """Rank, world size and node-local rank as torchrun (or visionzoo's own launcher) sets them,
    else as ``srun`` sets them for a job step of several tasks, else one process."""
    slurm = _slurm_info()
    if slurm is not None:
        return slurm
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def _slurm_info() -> DistInfo | None:
    """This task's place in an ``srun`` job step of more than one task (SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID), unless torchrun's variables are set: a single task (e.g. an
    sbatch script's own shell, or ``srun -n 1 ... --devices 8``) is not a launched worker."""
    env = os.environ
    if any(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    if not all(k in env for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        return None
    info = DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"]))
    return info if info.enabled else None


def expand_nodelist(nodelist: str) -> list[str]:
    """The host names of a Slurm host list, e.g. ``gpu-a[1,3-5],gpu-b7`` -> gpu-a1, gpu-a3,
    gpu-a4, gpu-a5, gpu-b7. Ranges keep their zero padding (``node[08-10]``), and a name may have
    several bracket groups (``rack[1-2]-n[1-2]``: every combination, the last group fastest)."""
    hosts: list[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip()):
        choices: list[list[str]] = []
        for literal, group in re.findall(r"([^\[]+)|\[([^\]]*)\]", item):
            choices.append([literal] if literal else _expand_ranges(group, nodelist))
        hosts += ["".join(parts) for parts in itertools.product(*choices)]
    if not hosts:
        raise UserError(f"no host in the Slurm node list '{nodelist}'")
    return hosts


def _expand_ranges(group: str, nodelist: str) -> list[str]:
    out = []
    for part in group.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise UserError(f"cannot read the Slurm node list '{nodelist}' (range '{part}')")
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi or lo) + 1)]
    return out


# MASTER_PORT under srun when the environment sets none: one port per job (by job id), so that
# two jobs sharing a node do not collide. Set MASTER_PORT in the sbatch script to choose another.
SLURM_BASE_PORT = 29500


def slurm_rendezvous() -> dict[str, str]:
    """MASTER_ADDR and MASTER_PORT for an ``srun`` job step: the environment's, else the first
    host of the step's (or job's) node list, where task 0 runs, and
    ``SLURM_BASE_PORT + SLURM_JOB_ID % 1000``."""
    env = os.environ
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise UserError("under srun: set MASTER_ADDR, or SLURM_JOB_NODELIST to find the first host")
        addr = expand_nodelist(nodelist)[0]
    port = env.get("MASTER_PORT") or str(SLURM_BASE_PORT + int(env.get("SLURM_JOB_ID", "0") or 0) % 1000)
    return {"MASTER_ADDR": addr, "MASTER_PORT": port}


def init(info: DistInfo, device: torch.device, timeout_s: int = 600) -> None:
    """Make ``device`` the current one (also with one process, e.g. on cuda:1), then join the
    process group (NCCL on CUDA, gloo on the CPU) when there is more than one rank."""
    select_device(device)
    if not info.enabled or dist.is_initialized():
        return
    if _slurm_info() is not None:  # env:// rendezvous reads these, as torchrun would have set them
        for key, value in {"RANK": str(info.rank), "WORLD_SIZE": str(info.world_size),
                           "LOCAL_RANK": str(info.local_rank), **slurm_rendezvous()}.items():
            os.environ.setdefault(key, value)
    backend = dist.get_default_backend_for_device(device) if device.type != "cpu" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    timeout = timedelta(seconds=timeout_s)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None:
        # torchrun's agent serves one TCPStore for every restart round, and its workers use it
        # without a per-round prefix: the keys a failed round left (gloo/NCCL addresses, barrier
        # counts) make the next round's set-up connect to dead peers or hang. A prefix per round
        # gives each round a clean namespace.
        store, _, _ = next(dist.rendezvous("env://", info.rank, info.world_size, timeout=timeout))
        kwargs.update(store=dist.PrefixStore(f"visionzoo/round_{restart}", store),
                      rank=info.rank, world_size=info.world_size)
    dist.init_process_group(backend, timeout=timeout, **kwargs)


def shutdown() -> None:
    """Leave the process group, if any, once every rank has got here."""
    if dist.is_initialized():
        # gloo's worker threads drop a finished collective's tensors (Python objects, so under the
        # GIL) just after the caller's wait() returns. A rank that went straight on to exit could
        # have that happen during interpreter shutdown, which aborts the process ("terminate
        # called without an active exception": 4 of 64 2-process runs here, 0 of 30 with it). The barrier
        # lets those threads finish first; its own work holds no tensors.
        dist.barrier()
        dist.destroy_process_group()


def on_main_rank(fn: Callable[[], T], what: str) -> T | None:
    """``fn()`` on rank 0 only (None elsewhere). A UserError or OSError it raises ends every rank
    with the same one line (one broadcast), instead of leaving the others waiting in their next
    collective until train.dist_timeout; ``what`` names the step in that line."""
    several = dist.is_initialized() and dist.get_world_size() > 1
    out, error = None, [None]
    if not several or dist.get_rank() == 0:
        try:
            out = fn()
        except UserError as err:
            error = [str(err)]
        except OSError as err:
            error = [f"{what}: {err.strerror or err}" + (f" ({err.filename})" if err.filename else "")]
    if several:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise_agreed(error[0])
    return out


def raise_agreed(message: str) -> NoReturn:
    """Raise the UserError every rank has just met together (rank 0's broadcast, an all-reduced
    flag); rank 0 says it, the others exit 2 quietly. With several ranks, a barrier first: each
    rank is about to exit, and one that exits while gloo's threads still drop the last
    collective's tensors aborts in interpreter shutdown (see ``shutdown``), exit -6 instead of 2.
    Call it on every rank or on none."""
    several = dist.is_initialized() and dist.get_world_size() > 1
    if several:
        dist.barrier()
    raise UserError(message, quiet=several and dist.get_rank() != 0, agreed=True)


def world_size() -> int:
    """Processes in the job (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all ranks (``t`` itself with one process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def in_launched_worker() -> bool:
    """True inside a worker that torchrun, ``launch_local`` or ``srun`` (a step of several tasks)
    started: never launch again."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ or _slurm_info() is not None


def params_in_sync(*models: torch.nn.Module | None, buffers: bool = True) -> bool:
    """Whether every rank holds the same weights of each of ``models`` (the network, its EMA;
    None is left out), and their buffers (BatchNorm statistics and counters) with ``buffers``:
    compares a float64 checksum of all of them."""
    if not dist.is_initialized():
        return True
    tensors = itertools.chain.from_iterable(
        itertools.chain(m.parameters(), m.buffers() if buffers else ()) for m in models if m is not None)
    with torch.no_grad():
        total = sum((t.detach().double() * (i + 1)).sum() for i, t in enumerate(tensors))
        sums = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
        dist.all_gather(sums, total)
    return all(torch.equal(s, sums[0]) for s in sums)


def buffer_sync(broadcast: bool) -> dict:
    """DistributedDataParallel's keyword for broadcasting rank 0's buffers before every training
    forward: forward_sync_buffers from torch 2.14 on (broadcast_buffers warns there), else
    broadcast_buffers."""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": broadcast}


def average_bn_stats(*modules: torch.nn.Module | None) -> None:
    """Average BatchNorm running statistics over ranks (timm's distribute_bn), so that every rank
    evaluates and saves the same network: without SyncBatchNorm each rank's statistics follow its
    own batches (DDP broadcasts rank 0's buffers only before a training forward)."""
    if not dist.is_initialized():
        return
    from timm.utils import distribute_bn

    for m in modules:
        if m is not None:
            distribute_bn(m, dist.get_world_size(), reduce=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(nproc: int, argv: list[str], monitor_interval: float = 0.5) -> int:
    """Run ``python -m visionzoo ARGV`` in ``nproc`` worker processes on this machine through
    torch's elastic launcher (what torchrun runs). If any worker fails, the launcher stops the
    others and this returns 1 with one line naming the failed rank, or 2 when the first to fail
    met a user error (its own line says which); 0 when all succeed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"visionzoo-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
        monitor_interval=monitor_interval, start_method="spawn",
    )
    # Each CPU worker gets its share of the cores; oversubscribed threads slow everything down.
    with _launcher_scope({"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}):
        try:
            elastic_launch(config, sys.executable)("-m", "visionzoo", *argv)
        except SignalException as err:
            # This process was signalled; the agent passed the signal on to the workers, which
            # checkpointed, and rank 0 printed the line that says how to continue.
            return 128 + int(err.sigval)
        except ChildFailedError as err:
            rank, failure = err.get_first_failure()
            codes = {f.exitcode for f in err.failures.values()}
            if codes <= STOPPED_EXIT_CODES:  # the workers themselves were signalled and stopped cleanly
                return failure.exitcode
            if failure.exitcode == USER_ERROR_EXIT:  # the first to fail met a user error and said it
                return USER_ERROR_EXIT
            print(f"visionzoo: error: worker rank {rank} failed (exit code {failure.exitcode}); "
                  f"the other workers were stopped", file=sys.stderr)
            return 1
    return 0


# The exit code of a worker that met a UserError (cli.main), having printed its one line.
USER_ERROR_EXIT = 2
# Exit codes of a worker that stopped on SIGINT, SIGTERM or SIGUSR1 after its checkpoint (errors.Stopped).
STOPPED_EXIT_CODES = {128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGUSR1}


# The signals torch's agent turns into SignalException (then stops the workers with the same
# signal), and SIGUSR1, which it leaves alone before torch 2.9 and by default after.
_LAUNCHER_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")


def _forward_sigusr1(signum: int, frame: object) -> None:
    """The launcher's SIGUSR1 (Slurm's warning before the time limit), handled as torch's agent
    handles SIGTERM: its default action would kill the launcher and orphan the workers, which
    would train on with no checkpoint and no requeue."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    raise SignalException(f"Process {os.getpid()} got signal: SIGUSR1", sigval=signal.Signals(signum))


@contextlib.contextmanager
def _launcher_scope(env_defaults: dict[str, str]) -> Iterator[None]:
    """Environment defaults for the workers while they run, SIGUSR1 passed on to them, and this
    process's signal handlers as they were afterwards: torch's launcher installs handlers that
    turn SIGTERM into an exception and never removes them, so a process that goes on after a
    launch (a notebook, the tests) would have every later child it forks, and SIGTERMs, ignore
    the signal."""
    added = {k: v for k, v in env_defaults.items() if k not in os.environ}
    # The agent's warnings on a stop ("Received 15 death signal", "Sending process ... closing
    # signal") and its error on a failed worker ("failed (exitcode: 2) local_rank: 0 ...") add
    # nothing to the workers' own line and launch_local's; a failure it cannot report raises.
    import logging

    # (torch sets a level on each of its modules' loggers, so each is raised, not the parent.)
    elastic_logs = [logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict)
                    if n.startswith("torch.distributed.elastic")]
    old_levels = [log.level for log in elastic_logs]
    for log in elastic_logs:
        log.setLevel(logging.CRITICAL)
    saved = {}
    if threading.current_thread() is threading.main_thread():
        saved = {s: signal.getsignal(s) for s in (getattr(signal, n, None) for n in _LAUNCHER_SIGNALS) if s}
    os.environ.update(added)
    if saved:  # the agent stops the workers with this signal: they checkpoint, requeue, exit 138
        signal.signal(signal.SIGUSR1, _forward_sigusr1)
    try:
        yield
    finally:
        for log, level in zip(elastic_logs, old_levels, strict=True):
            log.setLevel(level)
        for k in added:
            os.environ.pop(k, None)
        for s, handler in saved.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
