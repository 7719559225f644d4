"""The single definition of train and eval preprocessing for every recipe (torchvision's
``presets.py`` role).

Where each step runs (data.decode=cpu):
- per image, in DataLoader workers: decode, crop, resize, flip, RandAugment — ending in a uint8
  [C, H, W] tensor (for PIL images a view of the [H, W, C] bytes);
- per batch, on the training device (data/loading/device_batches.py): the copy there (non-blocking,
  from pinned memory on CUDA), the float conversion, ``Normalize`` with the config's mean/std in
  0-255 units and the memory layout. A uint8 batch is a quarter of the float one's bytes and
  the workers do no float work.

ImageFolder images arrive as opened, not yet decoded PIL images: a transform's ``prepare``
draws the random crop on the full-size coordinates from the file header, then lets Pillow's
JPEG decoder shrink the image by 1/2, 1/4 or 1/8 in the DCT domain (``draft``) when the crop
will be shrunk by at least that much anyway (data.draft, default on). The crop box is mapped
into the reduced image, so the augmentation distribution is unchanged; the pixels differ from
a full-size decode by the decoder's downscaling (data.draft=false decodes every image in full,
and the output then equals the torchvision v2 pipeline's bit for bit). In-memory data (CIFAR,
IDX) arrives as uint8 CHW tensors and goes through torchvision's v2 ops unchanged."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}
PIL_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
_LOG_RATIO = torch.log(torch.tensor(RATIO))  # float32, as v2.RandomResizedCrop keeps it

Box = tuple[int, int, int, int]  # top, left, height, width in full-size pixels


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
    def of(cls, d: Any) -> "Normalize":
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
            return self._apply(rows, scale.repeat(w), mean.repeat(w), std.repeat(w)).view(b, h, w, c).permute(0, 3, 1, 2)
        view = (-1, 1, 1)
        return self._apply(x.to(torch.float32, copy=True), scale.view(view), mean.view(view), std.view(view))

    def _apply(self, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        # x is float32; with float64 operands (mmcv) an in-place op computes in float64, rounds once.
        if self.order == "unit":
            x.div_(scale)
        x.sub_(mean)
        return x.mul_(std) if self.order == "mmcv" else x.div_(std)


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """A PIL image as a uint8 [C, H, W] tensor viewing [H, W, C] memory (one copy of the bytes)."""
    a = torch.from_numpy(np.array(img))
    return a.unsqueeze(0) if a.ndim == 2 else a.permute(2, 0, 1)


def as_uint8(x: Any) -> torch.Tensor:
    """The end of every per-image pipeline: a plain uint8 [C, H, W] tensor."""
    return pil_to_uint8(x) if isinstance(x, Image.Image) else x.as_subclass(torch.Tensor)


def random_resized_crop(height: int, width: int, scale: tuple[float, float]) -> Box:
    """RandomResizedCrop's box, drawn from torch's global generator exactly as
    v2.RandomResizedCrop.make_params draws it (same numbers, same order)."""
    area = height * width
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(_LOG_RATIO[0], _LOG_RATIO[1])).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    return central_box(height, width, RATIO)


def central_box(height: int, width: int, ratio: tuple[float, float]) -> Box:
    """RandomResizedCrop's fallback after ten rejected draws: the central crop of the closest
    aspect ratio in ``ratio``."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draft(img: Image.Image, shrink: float) -> int:
    """Let Pillow decode a JPEG ``img`` (opened, not yet loaded) shrunk by the largest of 8, 4,
    2 that is at most ``shrink``; returns the factor obtained (1: full size, e.g. not a JPEG)."""
    k = next((k for k in (8, 4, 2) if shrink >= k), 1)
    if k == 1:
        return 1
    w, h = img.size
    res = img.draft(img.mode, (w // k, h // k))
    if res is None:  # not a JPEG, or already loaded
        return 1
    return round(w / res[1][2])  # the box is the reduced image in full-size units


def resized_crop(img: Image.Image, box: Box, size: int, resample: int, scale: int = 1) -> Image.Image:
    """Crop ``box`` (full-size pixels) and resize it to size x size. At scale 1 this is
    torchvision's PIL resized_crop (crop, then resize); on an image decoded at 1/scale the box is
    mapped into it (fractional pixels) and resampled in one go."""
    top, left, h, w = box
    if scale == 1:
        out = img.crop((left, top, left + w, top + h))
        return out if out.size == (size, size) else out.resize((size, size), resample)
    return img.resize((size, size), resample, box=(left / scale, top / scale, (left + w) / scale, (top + h) / scale))


def timm_randaugment(config_str: str, image_size: int, mean: list[float], interp: str) -> Callable:
    """timm's RandAugment for PIL images, as every recipe configures it (the batched GPU version,
    data/augment/batched_randaugment.py, reads its ops back from this object)."""
    from timm.data.auto_augment import rand_augment_transform

    hparams = {
        "translate_const": int(image_size * 0.45),  # timm's default translation, 45% of the crop
        "img_mean": tuple(int(round(m)) for m in mean),  # fill colour for shear/rotate/translate
        "interpolation": PIL_RESAMPLE[interp],
    }
    return rand_augment_transform(config_str, hparams)


class CropFlipAugment:
    """RandomResizedCrop + horizontal flip (+ timm RandAugment): the ImageNet training
    augmentation, as v2.Compose([RandomResizedCrop, RandomHorizontalFlip, RandAugment]) draws
    and computes it, without v2's per-call dispatch; PIL images or uint8 CHW tensors in, uint8
    CHW out."""

    def __init__(self, d, draft_decode: bool = True):
        self.size, self.scale, self.hflip = d.image_size, tuple(d.crop_scale), d.hflip
        self.interp, self.resample = _INTERP[d.interpolation], PIL_RESAMPLE[d.interpolation]
        self.randaugment = (timm_randaugment(d.randaugment, d.image_size, d.mean, d.interpolation)
                            if d.randaugment else None)
        self.draft = draft_decode
        self.normalize = Normalize.of(d)

    def prepare(self, img: Image.Image) -> tuple[Box, int]:
        """Draw the crop on the opened image's full size; decode at 1/2-1/8 when the crop is
        shrunk at least that much."""
        box = random_resized_crop(img.height, img.width, self.scale)
        scale = draft(img, min(box[2], box[3]) / self.size) if self.draft else 1
        return box, scale

    def __call__(self, img: Image.Image | torch.Tensor, prepared: tuple[Box, int] | None = None) -> torch.Tensor:
        if isinstance(img, torch.Tensor):
            h, w = img.shape[-2:]
            top, left, ch, cw = random_resized_crop(h, w, self.scale)
            img = TF.resized_crop(img, top, left, ch, cw, [self.size, self.size], self.interp, antialias=True)
            if self.hflip > 0 and bool(torch.rand(1) < self.hflip):
                img = TF.horizontal_flip(img)
            if self.randaugment is None:
                return img
            img = TF.to_pil_image(img)  # timm's RandAugment works on PIL images
        else:
            if prepared is None:  # an image decoded elsewhere: draw its crop now
                prepared = random_resized_crop(img.height, img.width, self.scale), 1
            box, scale = prepared
            img = resized_crop(img, box, self.size, self.resample, scale)
            if self.hflip > 0 and bool(torch.rand(1) < self.hflip):
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            img = self.randaugment(img)
        return pil_to_uint8(img)


def resize_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) after resizing the short side to ``short`` (torchvision's rounding)."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


class ResizeCenterCrop:
    """Evaluation: resize the short side to ``resize``, centre-crop ``size`` (as v2.Resize +
    v2.CenterCrop); resize 0 keeps the stored size. A JPEG much larger than the resize target is
    decoded at 1/2-1/8 of its size (``draft``) and resized from there."""

    def __init__(self, d, draft_decode: bool = True):
        self.resize, self.size = d.test_resize, d.test_size
        self.interp, self.resample = _INTERP[d.interpolation], PIL_RESAMPLE[d.interpolation]
        self.draft = draft_decode
        self.normalize = Normalize.of(d)

    def prepare(self, img: Image.Image) -> tuple[int, int] | None:
        """The resize target from the full size; the decode shrinks towards it."""
        if self.resize <= 0:
            return None
        w, h = resize_size(img.width, img.height, self.resize)
        if self.draft:
            draft(img, min(img.width / w, img.height / h))
        return w, h

    def __call__(self, img: Image.Image | torch.Tensor, prepared: tuple[int, int] | None = None) -> torch.Tensor:
        if self.resize <= 0:
            return as_uint8(img)
        if isinstance(img, torch.Tensor):
            img = TF.resize(img, [self.resize], self.interp, antialias=True)
            return TF.center_crop(img, [self.size])
        w, h = prepared if prepared is not None else resize_size(img.width, img.height, self.resize)
        if img.size != (w, h):
            img = img.resize((w, h), self.resample)
        return pil_to_uint8(TF.center_crop(img, [self.size]))


class V2Uint8:
    """torchvision v2 ops (pad + RandomCrop, flip) ending in a uint8 CHW tensor."""

    def __init__(self, ops: list, d):
        self.ops = v2.Compose(ops) if ops else None
        self.normalize = Normalize.of(d)

    def __call__(self, img: Any) -> torch.Tensor:
        return as_uint8(self.ops(img) if self.ops is not None else img)


def train_transform(d) -> Callable:
    """Training augmentation for a DataConfig, ending in uint8 (its ``.normalize`` is applied to
    the batch on the device): crop, flip, optional RandAugment."""
    if d.augment == "imagenet":
        return CropFlipAugment(d, d.draft)
    ops: list = []
    if d.augment == "cifar":
        ops.append(v2.RandomCrop(d.image_size, padding=d.crop_padding))
    if d.augment != "none" and d.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(d.hflip))
    if d.randaugment:
        # timm's RandAugment works on PIL images; tensor inputs make a round trip.
        ops += [v2.ToPILImage(), timm_randaugment(d.randaugment, d.image_size, d.mean, d.interpolation)]
    return V2Uint8(ops, d)


def eval_transform(d) -> Callable:
    """Evaluation preprocessing, ending in uint8 (its ``.normalize`` is applied to the batch on
    the device): resize the short side to test_resize, centre-crop test_size (test_resize 0:
    images are used at their stored size, as for CIFAR and MNIST). JPEGs are decoded in full
    unless ``data.eval_draft``."""
    return ResizeCenterCrop(d, d.eval_draft)


def normalized(transform: Callable, img: Any) -> torch.Tensor:
    """One image through ``transform`` and its normalisation: the float [C, H, W] tensor a model
    takes (for callers outside a loader, e.g. predicting one file)."""
    return transform.normalize(transform(img))
