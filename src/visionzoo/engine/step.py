"""One optimizer step with mixed precision, for every task: scale → backward → unscale → clip →
``before_step`` hook → step → update.

Both loss-scaling styles of the seeds (apex O1/O2 with a dynamic scale, or a static scale such
as DenseNet's 1024) map onto ``torch.amp.GradScaler``: a static scale is the dynamic scaler
reset to the same value after every step. Clipping is a mode (optim.py ``clip_gradients``:
global norm, value, AGC, or DINO's per-tensor norm). A task adds what its reference does between
clipping and the step through ``before_step`` (DINO: the prototypes' gradients dropped while the
last layer is frozen). Steps whose gradients are not finite are skipped by the scaler and counted
— on the device: the fused optimizers of CUDA (optim.py) skip such a step without the host
reading the flag, so counting must not read it either; ``skipped`` reads the count (log points,
checkpoints, results)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from visionzoo.optim import clip_gradients


@dataclass(frozen=True)
class Clipping:
    """Gradient clipping: ``mode`` (optim.py ``clip_gradients``: none | norm | value | agc |
    per_tensor), its ``value`` and the ``params`` it acts on."""

    mode: str = "none"
    value: float = 0.0
    params: list = field(default_factory=list)


class GradStep:
    """Applies a loss to the optimizer; one instance per run."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, amp_dtype: torch.dtype | None,
                 loss_scale: str, init_scale: float, clipping: Clipping | None = None,
                 before_step: Callable[[], None] | None = None):
        self.optimizer, self.clipping = optimizer, clipping or Clipping()
        self.before_step = before_step
        fp16 = amp_dtype == torch.float16
        self.static_scale = float(loss_scale) if fp16 and loss_scale != "dynamic" else None
        scale = self.static_scale or init_scale
        self.scaler = torch.amp.GradScaler(device.type, init_scale=scale, enabled=fp16)
        self._skipped_before = 0  # steps dropped before this session (from a checkpoint)
        self._skipped: torch.Tensor | None = None  # steps dropped since, counted on the device

    @property
    def skips_nonfinite(self) -> bool:
        """Whether the loss scaler itself skips steps with non-finite gradients (fp16)."""
        return self.scaler.is_enabled()

    def __call__(self, loss: torch.Tensor, update: bool = True) -> None:
        """Backward ``loss``; when ``update``, also clip and step (gradient accumulation
        calls with update=False for all micro-batches but the last)."""
        self.scaler.scale(loss).backward()
        if not update:
            return
        c = self.clipping
        if c.mode != "none":
            self.scaler.unscale_(self.optimizer)
            clip_gradients(c.params, c.mode, c.value)
        if self.before_step is not None:
            self.before_step()
        self.scaler.step(self.optimizer)
        if self.scaler.is_enabled():
            found_inf = self.scaler._found_inf_per_device(self.optimizer)  # noqa: SLF001
            dropped = (sum(found_inf.values()) > 0).long()
            self._skipped = dropped if self._skipped is None else self._skipped + dropped
        self.scaler.update(self.static_scale)
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def skipped(self) -> int:
        """Optimizer steps dropped for non-finite gradients so far (a host read of the device count)."""
        return self._skipped_before + (int(self._skipped.item()) if self._skipped is not None else 0)

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state["scaler"])
        self._skipped_before, self._skipped = state.get("skipped", 0), None
