"""Where and how a run computes: device choice, numeric precision, seeding, timing syncs.

Written against ``torch.accelerator`` so that any accelerator PyTorch knows (CUDA, MPS, XPU, or
an out-of-tree backend such as an NPU) works without changes to the engines."""

from __future__ import annotations

import os
import random
import time

import numpy as np
import torch

from visionzoo.errors import UserError


def _accelerator() -> torch.device | None:
    return torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of the process with node-local rank ``local_rank``.

    ``auto``: the current accelerator (cuda > mps > ...) if there is one, else the CPU. An
    accelerator named without an index (``auto``, ``cuda``) gets index ``local_rank % count`` of
    the visible devices: one device per rank when a node's ranks all see all its devices, and
    index 0 when each rank sees only its own (SLURM ``--gpus-per-task``, per-rank
    CUDA_VISIBLE_DEVICES). An explicit index (``cuda:1``) is kept, if that device exists."""
    if name == "auto":
        acc = _accelerator()
        if acc is None:
            return torch.device("cpu")
        device = torch.device(acc.type)
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"unknown device '{name}' (try auto, cpu, cuda, cuda:1, mps)") from None
        if device.type == "cpu":
            return device
        acc = _accelerator()
        if acc is None or acc.type != device.type:
            raise UserError(f"device '{name}' is not available on this machine")
    if device.type == "mps":  # one device, no index
        return torch.device("mps")
    count = torch.accelerator.device_count()
    if device.index is None:
        return torch.device(device.type, local_rank % max(count, 1))
    if device.index >= count:
        raise UserError(f"device '{name}' is not available: this process sees {count} {device.type} device(s)")
    return device


def select_device(device: torch.device) -> None:
    """Make ``device`` the current device of its kind. Call it before the process group, the data
    loaders or any kernel: NCCL's object collectives (all_gather_object) stage on the current
    device, and DataLoader's pin-memory thread and nvJPEG open their contexts there, so without
    it every rank would use (and allocate on) device 0."""
    if device.type == "cpu" or device.index is None:
        return
    set_index = getattr(torch.accelerator, "set_device_index", None) or torch.accelerator.set_device_idx  # torch 2.6
    set_index(device.index)


def configure_determinism(deterministic: bool, cudnn_benchmark: bool) -> None:
    """train.deterministic and train.cudnn_benchmark. Call it before CUDA initialises: cuBLAS
    reads CUBLAS_WORKSPACE_CONFIG once, and deterministic algorithms on CUDA raise at the first
    cuBLAS call without it (":4096:8", NVIDIA's documented setting; a user's own value is kept).

    CUDA ops that have no deterministic kernel (AlexNet's adaptive average pooling and the ViT's
    bicubic position-embedding resampling, in backward) warn once instead of stopping the run."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic


def cpu_bf16_isa() -> str | None:
    """The instruction set that gives this CPU native bf16 matrix products ("amx_bf16" or
    "avx512_bf16"), or None. Only counted when ATen dispatches its AVX512 kernels: a process
    started with ATEN_CPU_CAPABILITY=avx2 or =default asked for an older instruction set, and
    bf16 autocast would then be emulated (slower than fp32)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return None
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx_bf16"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    return None


# Inductor's C++ vector width for the instruction set ATen was told to use (ATEN_CPU_CAPABILITY):
# inductor detects the CPU itself, and for ``default`` it emits at::vec code that its own headers,
# built without vectorisation then, cannot compile ("'vec' is not a member of 'at'").
_INDUCTOR_SIMDLEN = {"DEFAULT": 1, "AVX2": 256}


def compile_module(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``torch.compile(module)``; on the CPU, inductor's vector width follows the instruction set
    ATen dispatches (1, no vectorisation, under ATEN_CPU_CAPABILITY=default; 256 bits under avx2)."""
    simdlen = _INDUCTOR_SIMDLEN.get(torch.backends.cpu.get_cpu_capability()) if device.type == "cpu" else None
    if simdlen is not None:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.simdlen = simdlen
    return torch.compile(module)


def cpu_cores() -> int:
    """The cores this process may run on (its CPU affinity: a cgroup's or taskset's share)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def _busy_ticks(cpus: set[int], stat: str) -> int:
    """Clock ticks the CPUs ``cpus`` spent busy (user, nice, system, irq, softirq) in /proc/stat's text."""
    total = 0
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in rest.split()[:7])
            total += user + nice + system + irq + softirq
    return total


def busy_elsewhere(seconds: float = 0.15) -> float | None:
    """Cores that other processes keep busy, sampled over ``seconds``: the busy time of the cores
    this process may use (/proc/stat) less this process's own CPU time. None without /proc/stat."""
    try:
        cpus = set(os.sched_getaffinity(0))
        with open("/proc/stat") as f:
            before = _busy_ticks(cpus, f.read())
        own0, wall0 = os.times(), time.perf_counter()
        time.sleep(seconds)
        with open("/proc/stat") as f:
            after = _busy_ticks(cpus, f.read())
        own1, wall = os.times(), time.perf_counter() - wall0
    except (OSError, AttributeError, ValueError):
        return None
    own = (own1.user + own1.system) - (own0.user + own0.system)
    return max(0.0, ((after - before) / os.sysconf("SC_CLK_TCK") - own) / wall)


def cpu_threads(workers: int, local_ranks: int, environ: dict | None = None,
                elsewhere: float | None = None) -> tuple[int, str]:
    """Intra-op threads for training on the CPU, and why.

    PyTorch's default, a thread per core in every process, collapses as soon as anything else
    keeps a core busy: its threads wait for each other at every operation (BENCHMARKS.md "CPU
    threads": 23 images/s beside one busy core against 42 with one thread). So: one rank alone on
    an idle machine (``elsewhere``, the cores busy with other processes, rounds to 0) keeps a thread
    per core, the fastest there even beside loader workers that decode all the time; on a machine
    other processes load, the cores they keep busy and the loader workers are taken off; with
    several ranks on the machine, each takes its share of the cores less its workers.
    OMP_NUM_THREADS, when set, is the user's choice and is kept."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}"
    cores = cpu_cores()
    share = max(1, cores // max(local_ranks, 1))
    parts = [f"{cores} core{'s' if cores != 1 else ''}"]
    if local_ranks > 1:
        parts.append(f"/ {local_ranks} ranks")
    busy = round(elsewhere) if local_ranks <= 1 and elsewhere is not None else None
    if busy == 0:
        return share, f"{parts[0]}, idle"
    if busy:
        parts.append(f"- {busy} busy elsewhere")
    if workers:
        parts.append(f"- {workers} loader worker{'s' if workers != 1 else ''}")
    return max(1, share - (busy or 0) - workers), " ".join(parts)


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for train.amp, or None for full fp32.

    ``auto`` picks bf16 on CUDA GPUs that support it (no loss scaling needed), bf16 on CPUs with
    native bf16 (cpu_bf16_isa: AMX or avx512_bf16, where bf16 autocast trains about 2x faster
    than fp32) and fp32 on every other device (on CPUs without it bf16 is emulated and slower)."""
    if mode in ("none", "fp64"):  # fp64 is not autocast: the weights themselves are float64
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_bf16_isa() is not None:
        return torch.bfloat16
    return None


def weights_dtype(mode: str) -> torch.dtype:
    """The dtype of the weights (and of the inputs) for train.amp: float64 for ``fp64``, else
    float32 (autocast, when on, runs parts of the model in a lower precision)."""
    return torch.float64 if mode == "fp64" else torch.float32


def precision_name(dtype: torch.dtype | None) -> str:
    """The name the results row uses for a precision (an autocast dtype, or the weights' dtype)."""
    return {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
            torch.float64: "fp64"}[dtype]


def precision_label(dtype: torch.dtype | None, device: torch.device) -> str:
    """The precision as the run header prints it: on the CPU with the instruction set that
    decided it ("bf16 (avx512_bf16)", "fp32 (no native bf16)", "bf16 (emulated)")."""
    name = precision_name(dtype)
    if device.type != "cpu" or dtype in (torch.float16, torch.float64):
        return name
    isa = cpu_bf16_isa()
    if dtype == torch.bfloat16:
        return f"{name} ({isa or 'emulated: no avx512_bf16/AMX'})"
    return f"{name} ({'no native bf16' if isa is None else 'train.amp=none'})"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock timings are real."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def default_signals() -> None:
    """Give SIGTERM and SIGINT their default actions: a multiprocessing pool's worker forked
    while a training run (or torch's launcher) handled them would otherwise outlive
    ``Pool.terminate`` and hang the pool's exit."""
    import signal

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)


STOP, REQUEUE = 1, 2  # StopSignal.code: stop with a checkpoint; also requeue the Slurm job


class StopSignal:
    """Turns SIGTERM, SIGINT and SIGUSR1 into a code the training loop polls at step
    boundaries, so a run writes a checkpoint before it exits.

    Repeated SIGTERMs only set the flag: Slurm signals every process of a job step and torch's
    launcher forwards its own a few milliseconds later, and neither may cut the checkpoint
    short. A second SIGINT (Ctrl-C twice) exits at once, except in a worker of torch's launcher,
    which forwards the terminal's Ctrl-C a second time itself (and kills its workers after its
    own grace period). SIGUSR1 (Slurm's ``--signal=USR1@SECONDS`` warning) stops the same way
    and asks for the job to be requeued."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first stop signal
        self.requeue = False
        self._old: dict[int, object] = {}
        self._under_launcher = "TORCHELASTIC_RUN_ID" in os.environ

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001
        import signal

        if signum == signal.SIGINT and self.signum == signal.SIGINT and not self._under_launcher:
            raise KeyboardInterrupt
        if signum == signal.SIGUSR1:
            self.requeue = True
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopSignal:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for s, handler in self._old.items():
            signal.signal(s, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def code(self) -> int:
        """0: carry on; STOP: checkpoint and stop; REQUEUE: also requeue the Slurm job."""
        return REQUEUE if self.requeue else STOP if self.signum is not None else 0
