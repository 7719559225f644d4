"""Process-group set-up and reductions on torch.distributed.

A run always knows its rank and world size; with one process there is no process group and
the reductions are identities, so the engines have a single code path."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


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
    """Rank and world size as torchrun (or visionzoo's own launcher) sets them."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init(info: DistInfo, device: torch.device, timeout_s: int = 600) -> None:
    """Join the process group (NCCL on CUDA, gloo on the CPU) when there is more than one rank."""
    if not info.enabled or dist.is_initialized():
        return
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
    """Leave the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Processes in the job (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all ranks (``t`` itself with one process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank; a collective with a process group, free without
    one (no tensor, no device sync: it may be asked every training step)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor(float(flag), device=device)
    return bool(all_reduce_sum(t) > 0)


def in_launched_worker() -> bool:
    """True inside a worker that torchrun (or ``launch_local``) started: never launch again."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def params_in_sync(model: torch.nn.Module) -> bool:
    """Whether every rank holds the same weights (compares a float64 checksum of all of them)."""
    if not dist.is_initialized():
        return True
    with torch.no_grad():
        total = sum((p.detach().double() * (i + 1)).sum() for i, p in enumerate(model.parameters()))
        sums = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
        dist.all_gather(sums, total)
    return all(torch.equal(s, sums[0]) for s in sums)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(nproc: int, argv: list[str], monitor_interval: float = 0.5) -> int:
    """Run ``python -m visionzoo ARGV`` in ``nproc`` worker processes on this machine through
    torch's elastic launcher (what torchrun runs). If any worker fails, the launcher stops the
    others and this returns 1 with one line naming the failed rank; 0 when all succeed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # Each CPU worker gets its share of the cores; oversubscribed threads slow everything down.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"visionzoo-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
        monitor_interval=monitor_interval, start_method="spawn",
    )
    try:
        elastic_launch(config, sys.executable)("-m", "visionzoo", *argv)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        print(f"visionzoo: error: worker rank {rank} failed (exit code {failure.exitcode}); "
              f"the other workers were stopped", file=sys.stderr)
        return 1
    return 0
