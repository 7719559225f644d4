"""The per-image path: what DataLoader workers do to one image, ending in a uint8 [C, H, W]
tensor (for PIL images a view of the [H, W, C] bytes); the batch is normalised on the training
device (data/loading/device_batches.py). A uint8 batch is a quarter of the float one's bytes and
the workers do no float work.

The crops and flips of the augmentation presets (data/augment/registry.py names them) draw their
random numbers from torch's global generator exactly as the torchvision v2 transforms they
replace (v2.RandomResizedCrop, v2.RandomCrop, v2.RandomHorizontalFlip), and compute with
torchvision's kernels: on a uint8 tensor its tensor ops, on a PIL image Pillow's. Each has an
``apply`` that takes the draws instead, the seam where another path's draws are replayed.

ImageFolder images arrive as opened, not yet decoded PIL images: a transform's ``prepare``
draws the random crop on the full-size coordinates from the file header, then lets Pillow's
JPEG decoder shrink the image by 1/2, 1/4 or 1/8 in the DCT domain (``draft``) when the crop
will be shrunk by at least that much anyway (data.draft, default on). The crop box is mapped
into the reduced image, so the augmentation distribution is unchanged; the pixels differ from
a full-size decode by the decoder's downscaling (data.draft=false decodes every image in full,
and the output then equals the torchvision v2 pipeline's bit for bit)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from visionzoo.data.augment.normalize import Normalize
from visionzoo.errors import UserError

if TYPE_CHECKING:
    from visionzoo.config import DataConfig

_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}
PIL_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
_LOG_RATIO = torch.log(torch.tensor(RATIO))  # float32, as v2.RandomResizedCrop keeps it

Box = tuple[int, int, int, int]  # top, left, height, width in full-size pixels
Image_ = Image.Image | torch.Tensor  # a PIL image or a uint8 [C, H, W] tensor


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


def randaugment_of(d: DataConfig) -> Callable:
    """timm's RandAugment as data.randaugment configures it (per image, on PIL images)."""
    return timm_randaugment(d.randaugment, d.image_size, d.mean, d.interpolation)


def height_width(img: Image_) -> tuple[int, int]:
    """(height, width) of a PIL image or a [C, H, W] tensor."""
    if isinstance(img, torch.Tensor):
        return int(img.shape[-2]), int(img.shape[-1])
    return img.height, img.width


class ResizedCropFlip:
    """data.augment=imagenet: RandomResizedCrop(data.image_size, scale=data.crop_scale) and a
    horizontal flip with probability data.hflip, drawn and computed as v2.RandomResizedCrop +
    v2.RandomHorizontalFlip without v2's per-call dispatch: PIL images with Pillow's resize (from a
    draft decode when data.draft), uint8 tensors with torchvision's antialiased tensor resize."""

    def __init__(self, d: Any):
        self.size, self.scale, self.hflip = d.image_size, tuple(d.crop_scale), d.hflip
        self.interp, self.resample = _INTERP[d.interpolation], PIL_RESAMPLE[d.interpolation]
        self.draft = d.draft

    def prepare(self, img: Image.Image) -> tuple[Box, int]:
        """Draw the crop on the opened image's full size; decode at 1/2-1/8 when the crop is
        shrunk at least that much."""
        box = random_resized_crop(img.height, img.width, self.scale)
        scale = draft(img, min(box[2], box[3]) / self.size) if self.draft else 1
        return box, scale

    def __call__(self, img: Image_, prepared: tuple[Box, int] | None = None) -> Image_:
        if prepared is None:  # a tensor, or an image decoded elsewhere: draw its crop now
            prepared = random_resized_crop(*height_width(img), self.scale), 1
        box, scale = prepared
        return self.apply(img, box, self.hflip > 0 and bool(torch.rand(1) < self.hflip), scale)

    def apply(self, img: Image_, box: Box, flip: bool, scale: int = 1) -> Image_:
        """The crop ``box`` (full-size pixels; ``img`` decoded at 1/``scale``) resized to
        data.image_size, mirrored when ``flip``."""
        if isinstance(img, torch.Tensor):
            top, left, h, w = box
            img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], self.interp, antialias=True)
            return TF.horizontal_flip(img) if flip else img
        img = resized_crop(img, box, self.size, self.resample, scale)
        return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img


class PadCropFlip:
    """data.augment=cifar: zero padding of data.crop_padding pixels on every side, a data.image_size
    crop placed uniformly, a horizontal flip with probability data.hflip; drawn and computed as
    v2.RandomCrop(size, padding) + v2.RandomHorizontalFlip (PIL images or uint8 tensors)."""

    def __init__(self, d: Any):
        self.size, self.padding, self.hflip = d.image_size, d.crop_padding, d.hflip

    def draw(self, height: int, width: int) -> tuple[int, int, bool]:
        """(top, left) of the crop in the padded image, and the flip, from torch's global
        generator as v2.RandomCrop and v2.RandomHorizontalFlip draw them."""
        ph, pw = height + 2 * self.padding, width + 2 * self.padding
        if ph < self.size or pw < self.size:
            raise UserError(f"data.image_size={self.size} is larger than the {height}x{width} images "
                            f"padded by data.crop_padding={self.padding}")
        top = int(torch.randint(0, ph - self.size + 1, size=())) if ph > self.size else 0
        left = int(torch.randint(0, pw - self.size + 1, size=())) if pw > self.size else 0
        return top, left, self.hflip > 0 and bool(torch.rand(1) < self.hflip)

    def __call__(self, img: Image_, prepared: None = None) -> Image_:
        return self.apply(img, *self.draw(*height_width(img)))

    def apply(self, img: Image_, top: int, left: int, flip: bool) -> Image_:
        """The crop at (``top``, ``left``) of the padded image, mirrored when ``flip``."""
        if self.padding > 0:
            img = TF.pad(img, [self.padding] * 4, fill=0)
        img = TF.crop(img, top, left, self.size, self.size)
        return TF.horizontal_flip(img) if flip else img


class Stored:
    """data.augment=none: the image as stored (no crop, no flip)."""

    def __init__(self, d: Any):
        pass

    def __call__(self, img: Image_, prepared: None = None) -> Image_:
        return img


class PerImageAugment:
    """A preset's crop and flip (``crop``), then timm's RandAugment when the recipe has one
    (PIL images: tensors make a round trip), ending in a uint8 [C, H, W] tensor; ``normalize``
    is applied to the batch on the device."""

    def __init__(self, crop: Callable, randaugment: Callable | None, normalize: Normalize):
        self.crop, self.randaugment, self.normalize = crop, randaugment, normalize

    def prepare(self, img: Image.Image) -> Any:
        """The crop's draws on the opened image, before it is decoded (data.draft), if it has any."""
        prepare = getattr(self.crop, "prepare", None)
        return prepare(img) if prepare is not None else None

    def __call__(self, img: Image_, prepared: Any = None) -> torch.Tensor:
        x = self.crop(img, prepared)
        if self.randaugment is not None:
            x = self.randaugment(TF.to_pil_image(x) if isinstance(x, torch.Tensor) else x)
        return as_uint8(x)


def resize_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) after resizing the short side to ``short`` (torchvision's rounding)."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def eval_size(d: DataConfig) -> int:
    """Side of the square images a model sees at evaluation: the centre crop (test_size) when
    images are resized, else the stored size the recipe trains at (CIFAR, MNIST: image_size).
    Generated (synthetic) validation images are made at test_size."""
    from visionzoo.data.sources.table import data_source

    return d.test_size if (d.test_resize > 0 or data_source(d.name).generated) else d.image_size


class ResizeCenterCrop:
    """Evaluation: resize the short side to ``resize``, centre-crop ``size`` (as v2.Resize +
    v2.CenterCrop). Resize 0 keeps the stored size; an image of another size (a photo given to a
    28-px model, a folder of mixed sizes) is then brought to the model's by the same short-side
    resize and centre crop, to ``eval_size``. A JPEG much larger than the resize target is decoded
    at 1/2-1/8 of its size (``draft``) and resized from there."""

    def __init__(self, d: DataConfig, draft_decode: bool = True):
        self.resize, self.size = d.test_resize, d.test_size
        self.stored = eval_size(d)  # resize 0: the size images must have
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
        resize, size = self.resize, self.size
        if resize <= 0:
            if tuple(img.shape[-2:] if isinstance(img, torch.Tensor) else img.size) == (self.stored, self.stored):
                return as_uint8(img)
            resize = size = self.stored
        if isinstance(img, torch.Tensor):
            img = TF.resize(img, [resize], self.interp, antialias=True)
            return TF.center_crop(img, [size])
        w, h = prepared if prepared is not None else resize_size(img.width, img.height, resize)
        if img.size != (w, h):
            img = img.resize((w, h), self.resample)
        return pil_to_uint8(TF.center_crop(img, [size]))
