"""Where and how a run computes: device choice, numeric precision, seeding, timing syncs.

Written against ``torch.accelerator`` so that any accelerator PyTorch knows (CUDA, MPS, XPU, or
an out-of-tree backend such as an NPU) works without changes to the engines."""

from __future__ import annotations

import os
import random

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


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for train.amp, or None for full fp32.

    ``auto`` picks bf16 on CUDA GPUs that support it (no loss scaling needed) and fp32 on the
    CPU, where bf16 autocast is slower than fp32 on most processors."""
    if mode in ("none", "fp64"):  # fp64 is not autocast: the weights themselves are float64
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
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


class StopSignal:
    """Turns SIGTERM and SIGINT into a flag the training loop polls, so a run can write a
    checkpoint before it exits. A second signal exits at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignal":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for s, handler in self._old.items():
            signal.signal(s, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None
