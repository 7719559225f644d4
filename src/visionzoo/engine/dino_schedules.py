"""DINO's per-iteration schedules (LR, weight decay, teacher momentum: main_dino.py's
cosine_scheduler) and teacher temperature, and its per-tensor gradient clipping."""

from __future__ import annotations

import numpy as np
import torch


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """The reference's cosine_scheduler: linear warm-up from ``warmup_start`` to ``start``, then
    ``end + (start - end) * (1 + cos(pi * i / n)) / 2`` for i = 0..n-1 (n = remaining steps)."""
    warm = np.linspace(warmup_start, start, warmup_steps) if warmup_steps > 0 else np.array([])
    i = np.arange(total_steps - warmup_steps)
    main = end + 0.5 * (start - end) * (1 + np.cos(np.pi * i / max(len(i), 1)))
    return np.concatenate([warm, main])[:total_steps]


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int,
                          steps_per_epoch: int) -> np.ndarray:
    """Per step: ``linspace(warmup_temp, temp, warmup_epochs)`` over the first epochs, then
    ``temp``; constant within an epoch, as the reference indexes it by epoch."""
    per_epoch = np.concatenate([np.linspace(warmup_temp, temp, warmup_epochs),
                                np.full(max(epochs - warmup_epochs, 0), temp)])[:epochs]
    return np.repeat(per_epoch, steps_per_epoch)


@torch.no_grad()
def clip_per_tensor(params: list[torch.Tensor], max_norm: float) -> None:
    """Scale each gradient whose own L2 norm exceeds ``max_norm`` down to it (the reference's
    clip_gradients: tensor by tensor, unlike torch's global-norm clipping)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    # All on the device, a few foreach kernels: the reference reads every norm on the host.
    norms = torch.stack(torch._foreach_norm(grads))
    coefs = (max_norm / (norms.float() + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))
