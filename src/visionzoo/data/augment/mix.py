"""Mixup / CutMix with per-sample parameters, applied to a whole batch on its device.

Why this exists: ``timm.data.Mixup(mode="batch")`` uses one lambda and one box for the whole
batch, and timm's per-sample mode (``mode="elem"``) mixes in a Python loop over the samples,
i.e. a few small kernels per sample on the GPU. ``PerSampleMixup`` gives every sample its own
lambda / method / box like timm's elem mode, but mixes the batch with a handful of batched ops.

The random draws are the same as timm's elem mode, in the same order, from NumPy's global RNG
(the project checkpoints that state for exact resume): with the same seed, both produce the same
images and targets. The draws happen on the CPU; the per-sample parameters then travel to the
batch's device in one small non-blocking copy, so the host never waits on the device.
For float32/float64 images the results are bit-identical to timm's; for float16/bfloat16 the
blend is computed in float32 and rounded once, and targets use the float32 lambda (timm rounds
each step and casts lambda to the image dtype), so they differ at half-precision rounding level.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from visionzoo.transfer import to_device


class MixParams(NamedTuple):
    """Per-sample mixing parameters (CPU, NumPy) for a batch of ``B``; sample ``i`` mixes with
    sample ``B - 1 - i``."""

    lam: np.ndarray  # float32 [B]: weight of the sample's own label (after box correction); 1 = unmixed
    use_cutmix: np.ndarray  # bool [B]: the sample is cut-mixed (and never also blended)
    boxes: np.ndarray  # int64 [B, 4]: half-open (y1, y2, x1, x2); all zero where not cut-mixed


class PerSampleMixup:
    """Mixup / CutMix with a separate random lambda, method and box per sample.

    Same semantics and call convention as ``timm.data.Mixup(mode="elem", ...)``: ``prob`` is
    the per-sample probability of mixing at all; when both alphas are > 0, a sample uses
    CutMix with probability ``switch_prob``, else Mixup; lambda ~ Beta(alpha, alpha) of the
    chosen method; with ``correct_lam`` a CutMix lambda becomes ``1 - box area / image area``.
    Targets are label-smoothed one-hots mixed with the same lambdas.
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, num_classes: int = 1000,
                 correct_lam: bool = True) -> None:
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("PerSampleMixup needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.correct_lam = correct_lam
        self.mixup_enabled = True  # as in timm: a training loop may switch mixing off late in training

    def sample_params(self, batch_size: int, height: int, width: int) -> MixParams:
        """Draw the per-sample parameters for a ``batch_size`` batch of ``height x width``
        images from ``np.random``, consuming exactly the draws timm's elem mode makes."""
        n = batch_size
        lam = np.ones(n, dtype=np.float32)
        cut = np.zeros(n, dtype=bool)
        boxes = np.zeros((n, 4), dtype=np.int64)
        if not self.mixup_enabled:
            return MixParams(lam, cut, boxes)

        # Same order as timm's _params_per_elem (method switch, cutmix betas, mixup betas,
        # then the mix-or-not draw), so one seed gives both implementations the same batch.
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cut = np.random.rand(n) < self.switch_prob
            lam_cut = np.random.beta(self.cutmix_alpha, self.cutmix_alpha, size=n)
            lam_mix = np.random.beta(self.mixup_alpha, self.mixup_alpha, size=n)
            drawn = np.where(cut, lam_cut, lam_mix)
        elif self.mixup_alpha > 0:
            drawn = np.random.beta(self.mixup_alpha, self.mixup_alpha, size=n)
        else:
            cut = np.ones(n, dtype=bool)
            drawn = np.random.beta(self.cutmix_alpha, self.cutmix_alpha, size=n)
        lam = np.where(np.random.rand(n) < self.prob, drawn.astype(np.float32), lam)
        cut &= lam != 1.0  # unmixed samples get no box (timm skips them, drawing nothing)

        idx = np.flatnonzero(cut)
        if idx.size:
            # timm draws (cy, cx) one cut-mixed sample after the other; bounds that alternate
            # H, W, H, W, ... make one vectorised randint consume the identical stream.
            cy, cx = np.random.randint(0, np.tile([height, width], idx.size)).reshape(-1, 2).T
            ratio = np.sqrt(1 - lam[idx])  # float32, as timm computes it per sample
            cut_h = (height * ratio).astype(np.int64)
            cut_w = (width * ratio).astype(np.int64)
            y1 = np.clip(cy - cut_h // 2, 0, height)
            y2 = np.clip(cy + (cut_h + 1) // 2, 0, height)
            x1 = np.clip(cx - cut_w // 2, 0, width)
            x2 = np.clip(cx + (cut_w + 1) // 2, 0, width)
            boxes[idx] = np.stack([y1, y2, x1, x2], axis=1)
            if self.correct_lam:  # clipping at the border shrinks the box: the label follows the area
                lam[idx] = 1.0 - (y2 - y1) * (x2 - x1) / float(height * width)
        return MixParams(lam, cut, boxes)

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix images ``x`` [B, C, H, W] (B even) and int labels ``target`` [B]. Returns a new
        image tensor (``x`` is left untouched) and soft targets [B, num_classes] on ``x.device``."""
        if x.ndim != 4:
            raise ValueError(f"PerSampleMixup expects images [B, C, H, W], got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        if b % 2:
            raise ValueError(f"PerSampleMixup needs an even batch size (sample i mixes with "
                             f"sample B-1-i), got {b}")
        p = self.sample_params(b, h, w)
        blend = ~p.use_cutmix & (p.lam != 1.0)

        # All parameters in one float32 [B, 6] tensor (box corners are small ints, exact in
        # float32): a single host-to-device copy, from pinned memory on CUDA (truly async).
        packed = torch.from_numpy(np.column_stack([p.lam, blend, p.boxes]).astype(np.float32))
        packed = to_device(packed, x.device)
        lam, is_blend = packed[:, 0], packed[:, 1].bool()
        y1, y2, x1, x2 = packed[:, 2:].unsqueeze(-1).unbind(1)  # each [B, 1]

        flipped = x.flip(0)  # a copy: partners always contribute their original pixels
        lam4 = lam.view(b, 1, 1, 1)
        # Mixup, only where chosen: torch.where keeps the other samples bit-exact.
        out = torch.where(is_blend.view(b, 1, 1, 1), x * lam4 + flipped * (1 - lam4), x)
        # CutMix: per-sample box mask from row/column ranges; boxes are empty for other samples.
        rows = torch.arange(h, device=x.device, dtype=torch.float32)
        cols = torch.arange(w, device=x.device, dtype=torch.float32)
        in_rows = (rows >= y1) & (rows < y2)  # [B, H]
        in_cols = (cols >= x1) & (cols < x2)  # [B, W]
        in_box = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # [B, 1, H, W]
        out = torch.where(in_box, flipped, out).to(x.dtype)

        # Targets as timm's mixup_target: smoothed one-hot, mixed with the flipped batch.
        off = self.label_smoothing / self.num_classes
        on = 1.0 - self.label_smoothing + off
        onehot = torch.full((b, self.num_classes), off, device=x.device, dtype=torch.float32)
        onehot.scatter_(1, target.to(x.device).long().view(-1, 1), on)
        lam_t = lam.to(torch.promote_types(torch.float32, x.dtype)).unsqueeze(1)
        soft = onehot * lam_t + onehot.flip(0) * (1 - lam_t)
        return out, soft
