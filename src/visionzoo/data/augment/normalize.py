"""The normalisation every path ends with: a uint8 or float batch (or one image) to the float32
a model takes, with the data's mean and std in 0-255 units, in the float32 operations of the
recipe's reference. The per-image path applies it to each uint8 batch on the training device
(data/loading/device_batches.py); the batched paths at the end of their augmentation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from visionzoo.config import DataConfig


@dataclass(frozen=True)
class Normalize:
    """A uint8 or float image batch [B, C, H, W] (or one [C, H, W] image) normalised as float32,
    mean/std in 0-255 units, in the float32 operations of the recipe's reference (``order``,
    data.normalize): ``unit``: x/255, then (x - mean/255) / (std/255), as torchvision's
    ToTensor + Normalize (mean/255 and std/255 rounded once to float32: 0.485, ... for ImageNet);
    ``pixel``: (x - mean) / std, as timm's PrefetchLoader; ``mmcv``: (x - mean) * (1/std), as
    mmcv.imnormalize under OpenCV 4 (float64 mean and 1/std; OpenCV computes with float64
    scalars in float64 and rounds each result once to the image's float32). Every operand is a
    tensor on the batch's device (CUDA would turn a division by a host scalar into a
    multiplication), so a batch on any device gets the values the reference's per-image transform
    gives on the CPU, bit for bit."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    order: str = "unit"

    @classmethod
    def of(cls, d: DataConfig) -> Normalize:
        """The normalisation of a config's data section."""
        return cls(tuple(d.mean), tuple(d.std), d.normalize)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, mean, std-or-1/std) as tensors on ``device`` (one asynchronous copy): float32,
        float64 for ``mmcv`` (the in-place operations on the float32 batch then compute in
        float64 and round once, as OpenCV does)."""
        from visionzoo.transfer import send

        c, dtype = len(self.mean), torch.float32
        if self.order == "unit":  # the reference's constants: float32 of mean/255, std/255
            stats = [[255.0] * c, [m / 255 for m in self.mean], [s / 255 for s in self.std]]
        elif self.order == "mmcv":  # mmcls keeps float32 arrays; imnormalize: float64(mean), 1 / float64(std)
            mean32, std32 = (torch.tensor(v, dtype=torch.float32).double() for v in (self.mean, self.std))
            stats = [[1.0] * c, mean32.tolist(), (1 / std32).tolist()]
            dtype = torch.float64 if device.type != "mps" else torch.float32  # MPS has no float64
        else:
            stats = [[1.0] * c, list(self.mean), list(self.std)]
        scale, mean, std = send([torch.tensor(v, dtype=torch.float64) for v in stats], device, dtype)
        return scale, mean, std

    def __call__(self, x: torch.Tensor, stats: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``stats``: ``on(x.device)``, when the caller keeps them for every batch."""
        scale, mean, std = stats if stats is not None else self.on(x.device)
        c = x.shape[-3]
        if x.dim() == 4 and c > 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # [B, H, W, C] memory: broadcast along rows of W * C values, which vectorises (over
            # the innermost C alone it runs ~4x slower on a CPU); same values.
            b, _, h, w = x.shape
            rows = x.permute(0, 2, 3, 1).reshape(-1, w * c).to(torch.float32, copy=True)
            out = self._apply(rows, scale.repeat(w), mean.repeat(w), std.repeat(w))
            return out.view(b, h, w, c).permute(0, 3, 1, 2)
        view = (-1, 1, 1)
        return self._apply(x.to(torch.float32, copy=True), scale.view(view), mean.view(view), std.view(view))

    def _apply(self, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        # x is float32; with float64 operands (mmcv) an in-place op computes in float64, rounds once.
        if self.order == "unit":
            x.div_(scale)
        x.sub_(mean)
        return x.mul_(std) if self.order == "mmcv" else x.div_(std)
