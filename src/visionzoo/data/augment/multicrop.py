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
in 10^5). uint8 CHW tensors (CIFAR, MNIST-style IDX files) go through the v2 ops unchanged.
Solarization thresholds at 128 in 0-255 units. In-memory data sets and JPEGs decoded on the
device have a batched version (``BatchedMultiCrop``, below)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as TF1

from visionzoo.data.augment.presets import (
    PIL_RESAMPLE,
    Box,
    Normalize,
    draft,
    pil_to_uint8,
    random_resized_crop,
    resized_crop,
)


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

    def __init__(self, d, dino):
        interp = InterpolationMode(d.interpolation)
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
        self.normalize = Normalize.of(d)

        # uint8 tensors: the torchvision v2 ops, as composed for every image before.
        def jitter() -> list:
            # Flip, then colour: jitter with prob color_jitter_p, greyscale with prob grayscale_p
            # (both are no-ops on single-channel images, where only brightness/contrast act).
            return [v2.RandomHorizontalFlip(d.hflip), v2.RandomApply([cj], p=dino.color_jitter_p),
                    v2.RandomGrayscale(dino.grayscale_p)]

        def crop(size: int, scale: list[float]) -> v2.Transform:
            return v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=interp, antialias=True)

        self.tensor_views = (
            [v2.Compose([crop(gsize, dino.global_crops_scale), *jitter(), _blur(dino.blur_sigma, gsize, p1)]),
             v2.Compose([crop(gsize, dino.global_crops_scale), *jitter(), _blur(dino.blur_sigma, gsize, p2),
                         v2.RandomSolarize(128, p=dino.solarize_p)])]
            + [v2.Compose([crop(lsize, dino.local_crops_scale), *jitter(), _blur(dino.blur_sigma, lsize, pl)])]
            * dino.local_crops_number)
        self.local_crops_number = dino.local_crops_number

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

    def prepare(self, img: Image.Image) -> tuple[list[_View], int]:
        """All draws of an opened image, from its full size; decode it at 1/2-1/8 when every
        crop shrinks at least that much."""
        views = [self._draw(img.height, img.width, spec) for spec in self.specs]
        shrink = min(min(v.box[2], v.box[3]) / spec.size for v, spec in zip(views, self.specs))
        return views, (draft(img, shrink) if self.draft else 1)

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

    def __call__(self, image, prepared: tuple[list[_View], int] | None = None) -> list[torch.Tensor]:
        if isinstance(image, torch.Tensor):
            return [view(image).as_subclass(torch.Tensor) for view in self.tensor_views]
        views, scale = prepared if prepared is not None else (
            [self._draw(image.height, image.width, spec) for spec in self.specs], 1)
        return [self._crop(image, v, spec, scale) for v, spec in zip(views, self.specs)]
