"""Optimizers, gradient clipping and per-step schedules.

Schedules are precomputed as one value per optimizer step (DINO's style) and indexed by the
global step, so resuming mid-epoch and logging the LR are both trivial. Gradient clipping is a
mode: the global norm, a value, timm's adaptive clipping (NFNet) or DINO's norm per tensor."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

if TYPE_CHECKING:
    from visionzoo.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float, exclude_bias_norm: bool,
                 exclude_names: Sequence[str] = ()) -> list[dict]:
    """One group, or two when some parameters skip decay: every 1-D tensor (biases, norm gains)
    with ``exclude_bias_norm``, and every parameter whose own name (after the last dot) contains
    one of ``exclude_names``. The name rule is DeepMind's NFNets' (experiment_nfnets.py,
    ``Experiment._make_opt``: names containing 'gain' or 'bias' go to the group without decay):
    timm's NFNet conv gains are (out, 1, 1, 1) tensors, which a 1-D rule would decay."""
    def exempt(name: str, p: torch.Tensor) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        return (exclude_bias_norm and p.ndim <= 1) or any(s in leaf for s in exclude_names)

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not exclude_bias_norm and not exclude_names:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    decay = [p for n, p in params if not exempt(n, p)]
    no_decay = [p for n, p in params if exempt(n, p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, o: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov) or AdamW for an OptimConfig, using the fastest kernels the
    device has (fused on CUDA, foreach elsewhere)."""
    groups = param_groups(model, o.weight_decay, o.wd_exclude_bias_norm, o.wd_exclude)
    fast = {"fused": True} if device_type == "cuda" else {"foreach": True}
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, **fast)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), **fast)


def clip_parameters(model: nn.Module, o: OptimConfig) -> list[torch.Tensor]:
    """The parameters gradient clipping acts on: AGC leaves out the classifier (as NFNets do)."""
    if o.clip_mode != "agc" or not o.agc_exclude:
        return [p for p in model.parameters() if p.requires_grad]
    return [
        p for n, p in model.named_parameters()
        if p.requires_grad and not any(n.startswith(prefix) for prefix in o.agc_exclude)
    ]


def clip_gradients(params: Iterable[torch.Tensor], mode: str, value: float) -> None:
    """Clip in place: ``norm`` (global L2 norm), ``value``, ``agc`` (timm's adaptive clipping,
    unit-wise ratio of gradient norm to parameter norm, eps 1e-3) or ``per_tensor`` (DINO)."""
    if mode == "none":
        return
    if mode == "per_tensor":
        clip_per_tensor(list(params), value)
        return
    from timm.utils import dispatch_clip_grad

    dispatch_clip_grad(params, value, mode=mode)


@torch.no_grad()
def clip_per_tensor(params: list[torch.Tensor], max_norm: float) -> None:
    """Scale each gradient whose own L2 norm exceeds ``max_norm`` down to it (DINO's
    utils.clip_gradients: tensor by tensor, unlike torch's global-norm clipping)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    # All on the device, a few foreach kernels: the reference reads every norm on the host.
    norms = torch.stack(torch._foreach_norm(grads))
    coefs = (max_norm / (norms.float() + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """DINO's cosine_scheduler: linear warm-up from ``warmup_start`` to ``start`` (linspace: at
    ``start`` on its last step), then ``end + (start - end) * (1 + cos(pi * i / n)) / 2`` for
    i = 0..n-1 (n = remaining steps)."""
    warm = np.linspace(warmup_start, start, warmup_steps) if warmup_steps > 0 else np.array([])
    i = np.arange(total_steps - warmup_steps)
    main = end + 0.5 * (start - end) * (1 + np.cos(np.pi * i / max(len(i), 1)))
    return np.concatenate([warm, main])[:total_steps]


def lr_schedule(s: ScheduleConfig, base_lr: float, epochs: int, steps_per_epoch: int) -> np.ndarray:
    """LR for every optimizer step of the run: linear warm-up from ``warmup_lr``, then cosine to
    ``min_lr``, step decay at ``milestones``, or constant. ``by=epoch`` holds each value for a
    whole epoch (as schedulers stepped once per epoch do), the warm-up's too: torchvision's
    references/classification train.py steps LinearLR(start_factor=warmup_lr/lr,
    total_iters=warmup_epochs), then the main scheduler (SequentialLR), once after each epoch."""
    total = epochs * steps_per_epoch
    steps = np.arange(total, dtype=np.float64)
    t = np.floor(steps / steps_per_epoch) * steps_per_epoch if s.by == "epoch" else steps
    warm = int(round(s.warmup_epochs * steps_per_epoch))
    if s.name == "cosine":
        span = max(total - warm, 1)
        progress = np.clip((t - warm) / span, 0.0, 1.0)
        lrs = s.min_lr + 0.5 * (base_lr - s.min_lr) * (1 + np.cos(math.pi * progress))
    elif s.name == "step":
        epoch = np.floor(steps / steps_per_epoch)
        drops = sum((epoch >= m).astype(np.float64) for m in s.milestones) if s.milestones else 0.0
        lrs = base_lr * s.gamma ** drops * np.ones_like(steps)
    else:
        lrs = np.full_like(steps, base_lr)
    if warm > 0:  # t: the step, or with by=epoch the first step of its epoch (a whole number of epochs)
        lrs[:warm] = s.warmup_lr + (base_lr - s.warmup_lr) * t[:warm] / warm
    return lrs
