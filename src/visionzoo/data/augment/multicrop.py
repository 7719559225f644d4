"""DINO's multi-crop augmentation and its loader (labels are loaded but never used).

Each image becomes 2 global crops (data.image_size px, scale dino.global_crops_scale) and
dino.local_crops_number local crops (dino.local_crop_size px, scale dino.local_crops_scale),
each flipped, colour-jittered, maybe greyed and blurred; the second global crop may also be
solarized. Probabilities follow the reference (BYOL's asymmetric recipe): blur 1.0 on global
crop 1, 0.1 on global crop 2, 0.5 on local crops; solarize 0.2 on global crop 2 only.

Per image, in DataLoader workers (data.decode=cpu): ``MultiCropTransform`` hands over uint8
crops, normalised a batch at a time on the training device (data/loading/device_batches.py). On PIL
images (ImageFolder) it draws exactly what the torchvision v2 pipeline of these steps draws,
in the same order, but all of an image's draws before it is decoded (they depend on its size
only), so a JPEG is decoded at 1/2-1/8 of its size when every crop shrinks at least that much
(data.draft); it applies them with Pillow and torchvision's PIL kernels, and blurs with a
separable kernel (torchvision's 2-D one, factored: at most 1 grey level apart, on a few pixels
in 10^5). uint8 CHW tensors (CIFAR, MNIST-style IDX files) go through the kernels the v2
transforms call on tensors, with the same draws. ``draw`` and ``apply`` split the draws from
the pixels (the seam where the batched path's draws are replayed). Solarization thresholds at
128 in 0-255 units. In-memory data sets and JPEGs decoded on the device have a batched version
(``BatchedMultiCrop``, data/augment/multicrop_batched.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as TF1
from torchvision.transforms.v2 import functional as TF

from visionzoo.data.augment.normalize import Normalize
from visionzoo.data.augment.per_image import (
    PIL_RESAMPLE,
    Box,
    draft,
    height_width,
    pil_to_uint8,
    random_resized_crop,
    resized_crop,
)

if TYPE_CHECKING:
    from visionzoo.config import DataConfig, DinoConfig

# ColorJitter's ops in its numbering (brightness, contrast, saturation, hue), on tensors.
_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _kernel_size(sigma: list[float], size: int) -> int:
    """The blur kernel covers ±3 sigma of the largest sigma, capped at the crop size (odd)."""
    k = 2 * math.ceil(3 * sigma[1]) + 1
    return max(min(k, size if size % 2 else size - 1), 1)


def _blur(sigma: list[float], size: int, p: float) -> v2.Transform:
    """Gaussian blur with sigma drawn uniformly from ``sigma`` (px), applied with probability p."""
    return v2.RandomApply([v2.GaussianBlur(_kernel_size(sigma, size), sigma=tuple(sigma))], p=p)


def blur_uint8(x: torch.Tensor, sigma: float, k: int) -> torch.Tensor:
    """torchvision's Gaussian blur of a uint8 [C, H, W] image (k x k kernel, reflect padding,
    rounded back to uint8) as two 1-D passes of k shifted multiply-adds over [H, W, C] memory:
    2k instead of k^2 products per pixel, and ~3x faster than a grouped conv2d on a CPU core.
    Returns [C, H, W] viewing [H, W, C] memory."""
    lim = (k - 1) / (2.0 * math.sqrt(2.0))
    # torchvision's 1-D kernel
    kern = torch.softmax(torch.linspace(-lim, lim, steps=k).div(sigma).pow(2).neg(), dim=0).tolist()
    r, (h, w) = k // 2, x.shape[-2:]
    hwc = x.permute(1, 2, 0).float()
    p = F.pad(hwc.permute(2, 0, 1).unsqueeze(0), [r] * 4, mode="reflect")[0].permute(1, 2, 0).contiguous()
    rows = p[:, :w] * kern[0]
    for j in range(1, k):
        rows.add_(p[:, j:j + w], alpha=kern[j])
    out = rows[:h] * kern[0]
    for j in range(1, k):
        out.add_(rows[j:j + h], alpha=kern[j])
    return out.round_().to(torch.uint8).permute(2, 0, 1)


@dataclass
class _Spec:
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize: bool  # whether the view has a (random) solarization step


@dataclass
class _View:
    """One crop's random draws."""

    box: Box
    flip: bool
    jitter: tuple[list[int], list[float | None]] | None  # op order, (b, c, s, h) factors; None: not applied
    grey: bool
    sigma: float | None  # None: not blurred
    solarize: bool


class MultiCropTransform:
    """image → list of uint8 crops ``[global_1, global_2, local_1, ..., local_n]`` (``normalize``:
    the data's mean/std, applied to the batch on the device)."""

    def __init__(self, d: DataConfig, dino: DinoConfig):
        b, c, s, h = dino.color_jitter
        gsize, lsize = d.image_size, dino.local_crop_size
        p1, p2, pl = dino.blur_p
        self.hflip, self.jitter_p, self.grey_p = d.hflip, dino.color_jitter_p, dino.grayscale_p
        self.sigma, self.solarize_p = tuple(dino.blur_sigma), dino.solarize_p
        cj = v2.ColorJitter(b, c, s, h)
        self.jitter_ranges = [cj.brightness, cj.contrast, cj.saturation, cj.hue]  # None: that op is off
        self.specs = ([_Spec(gsize, tuple(dino.global_crops_scale), p1, False),
                       _Spec(gsize, tuple(dino.global_crops_scale), p2, True)]
                      + [_Spec(lsize, tuple(dino.local_crops_scale), pl, False)] * dino.local_crops_number)
        self.resample, self.draft = PIL_RESAMPLE[d.interpolation], d.draft
        self.interp = InterpolationMode(d.interpolation)
        self.normalize = Normalize.of(d)

    def _draw(self, height: int, width: int, spec: _Spec) -> _View:
        # The order and kind of draws of the v2 pipeline: crop, flip, RandomApply(ColorJitter) with
        # ColorJitter's permutation and factors, RandomGrayscale, RandomApply(GaussianBlur) with its
        # sigma, RandomSolarize. A random transform with probability p applies when rand < p.
        box = random_resized_crop(height, width, spec.scale)
        flip = bool(torch.rand(1) < self.hflip)
        jitter = None
        if bool(torch.rand(1) < self.jitter_p):
            order = torch.randperm(4).tolist()
            jitter = order, [None if r is None else float(torch.empty(1).uniform_(r[0], r[1]).item())
                             for r in self.jitter_ranges]
        grey = bool(torch.rand(1) < self.grey_p)
        sigma = float(torch.empty(1).uniform_(*self.sigma).item()) if bool(torch.rand(1) < spec.blur_p) else None
        solarize = bool(torch.rand(1) < self.solarize_p) if spec.solarize else False
        return _View(box, flip, jitter, grey, sigma, solarize)

    def draw(self, height: int, width: int) -> list[_View]:
        """Every view's draws for an image of height x width, from torch's global generator."""
        return [self._draw(height, width, spec) for spec in self.specs]

    def prepare(self, img: Image.Image) -> tuple[list[_View], int]:
        """All draws of an opened image, from its full size; decode it at 1/2-1/8 when every
        crop shrinks at least that much."""
        views = self.draw(img.height, img.width)
        shrink = min(min(v.box[2], v.box[3]) / spec.size for v, spec in zip(views, self.specs, strict=True))
        return views, (draft(img, shrink) if self.draft else 1)

    def apply(self, image: Image.Image | torch.Tensor, views: list[_View], scale: int = 1) -> list[torch.Tensor]:
        """The uint8 crops ``views`` describe (PIL: decoded at 1/``scale``): the seam where another
        path's draws are replayed."""
        crop = self._crop_tensor if isinstance(image, torch.Tensor) else self._crop
        return [crop(image, v, spec, scale) for v, spec in zip(views, self.specs, strict=True)]

    def _crop_tensor(self, x: torch.Tensor, view: _View, spec: _Spec, scale: int = 1) -> torch.Tensor:
        # The kernels the v2 transforms call on a uint8 tensor, in their order.
        top, left, h, w = view.box
        x = TF.resized_crop(x, top, left, h, w, [spec.size, spec.size], self.interp, antialias=True)
        if view.flip:
            x = TF.horizontal_flip(x)
        if view.jitter is not None:
            order, factors = view.jitter
            for op in order:
                if factors[op] is not None:
                    x = _JITTER[op](x, factors[op])
        if view.grey:
            x = TF.rgb_to_grayscale(x, num_output_channels=x.shape[-3])
        if view.sigma is not None:
            k = _kernel_size(list(self.sigma), spec.size)
            x = TF.gaussian_blur(x, [k, k], [view.sigma, view.sigma])
        return TF.solarize(x, 128) if view.solarize else x

    def _crop(self, img: Image.Image, view: _View, spec: _Spec, scale: int) -> torch.Tensor:
        out = resized_crop(img, view.box, spec.size, self.resample, scale)
        if view.flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        if view.jitter is not None:
            order, (b, c, s, h) = view.jitter
            for op in order:
                if op == 0 and b is not None:
                    out = TF1.adjust_brightness(out, b)
                elif op == 1 and c is not None:
                    out = TF1.adjust_contrast(out, c)
                elif op == 2 and s is not None:
                    out = TF1.adjust_saturation(out, s)
                elif op == 3 and h is not None:
                    out = TF1.adjust_hue(out, h)
        if view.grey and out.mode == "RGB":  # torchvision's PIL greyscale, without its NumPy round trip
            out = out.convert("L").convert("RGB")
        x = pil_to_uint8(out)
        if view.sigma is not None:
            x = blur_uint8(x, view.sigma, _kernel_size(list(self.sigma), spec.size))
        if view.solarize:
            x = torch.where(x >= 128, 255 - x, x)
        return x

    def __call__(self, image: Image.Image | torch.Tensor,
                 prepared: tuple[list[_View], int] | None = None) -> list[torch.Tensor]:
        if prepared is None:  # a tensor, or an image decoded elsewhere: draw its crops now
            prepared = self.draw(*height_width(image)), 1
        return self.apply(image, *prepared)
