"""Supervised training augmentation of a whole batch at once, with tensor ops on the training
device: the crops and flips of the presets (data/augment/registry.py) for in-memory splits
(CIFAR, MNIST; loading/in_memory.py) and images decoded on the device (loading/device_decode.py),
followed by RandAugment and the normalisation (``BatchAugment``); DINO's multi-crop views of
decoded images (augment/multicrop_batched.py).

Random numbers come from a CPU generator, so a run draws the same crops on any device; they
travel to the device in one asynchronous copy (visionzoo/transfer.py). Each crop is a draw
function and an apply function (``crop_flip_draws`` / ``crop_flip``, ``resized_crop_draws`` /
``resized_crops``): the seam where the per-image path's draws are replayed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from visionzoo.data.augment import multicrop_batched
from visionzoo.data.augment.multicrop_batched import BatchedMultiCrop, pad_batch
from visionzoo.data.augment.normalize import Normalize
from visionzoo.data.augment.per_image import central_box
from visionzoo.errors import UserError
from visionzoo.transfer import send

if TYPE_CHECKING:
    from visionzoo.config import DataConfig, DinoConfig

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
_TRIES = 10  # crop draws before the central-crop fallback, as torchvision's get_params


def crop_flip_draws(
    b: int, height: int, width: int, size: int, padding: int, hflip: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The draws of ``random_crop_flip`` for b images of height x width: the crops' top and left
    in the padded images (uniform over every valid position) and the flips, CPU tensors [b]."""
    oy = torch.randint(0, height + 2 * padding - size + 1, (b,), generator=generator)
    ox = torch.randint(0, width + 2 * padding - size + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < hflip if hflip > 0 else torch.zeros(b, dtype=torch.bool)
    return oy, ox, flip


def crop_flip(x: torch.Tensor, size: int, padding: int, oy: torch.Tensor, ox: torch.Tensor,
              flip: torch.Tensor) -> torch.Tensor:
    """The ``size`` crops at (``oy``, ``ox``) of a [B, C, H, W] batch (any dtype) zero-padded by
    ``padding``, mirrored where ``flip``: one gather, no arithmetic on the pixels."""
    b = x.shape[0]
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))
    dev = x.device
    any_flip = bool(flip.any())  # a CPU tensor: no device sync
    oy, ox, flip = send([oy, ox, flip], dev, torch.int64)
    ar = torch.arange(size, device=dev)
    rows = (oy[:, None] + ar)[:, :, None]  # [B, S, 1]
    cols = (ox[:, None] + ar)[:, None, :]  # [B, 1, S]
    if any_flip:
        # A flipped crop reads its columns right to left.
        cols = torch.where(flip.bool()[:, None, None], cols.flip(-1), cols)
    batch_idx = torch.arange(b, device=dev)[:, None, None]
    out = x[batch_idx, :, rows, cols]  # [B, S, S, C]
    return out.permute(0, 3, 1, 2)


def random_crop_flip(
    x: torch.Tensor, size: int, padding: int, hflip: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample random crop of ``size`` after zero padding, and random horizontal flip, of a
    [B, C, H, W] batch (any dtype). Offsets are uniform over every valid position."""
    b, _, h, w = x.shape
    return crop_flip(x, size, padding, *crop_flip_draws(b, h, w, size, padding, hflip, generator))


def crop_params(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                u: list[list[float]]) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params (top, left, h, w) with its uniform draws taken from ``u``
    (``_TRIES`` rows of 4 numbers in [0, 1)) instead of the global RNG."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for r_area, r_ratio, r_top, r_left in u:
        target_area = area * (scale[0] + (scale[1] - scale[0]) * r_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * r_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(r_top * (height - h + 1)), int(r_left * (width - w + 1)), h, w
    return central_box(height, width, ratio)


def _aa_filter(x: torch.Tensor, mode: str) -> torch.Tensor:
    """torch's antialiasing kernels (``F.interpolate(..., antialias=True)``): the triangle for
    bilinear, Keys' cubic with a = -0.5 (Pillow's) for bicubic."""
    x = x.abs()
    if mode == "bilinear":
        return (1 - x).clamp(min=0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(n_in: torch.Tensor, out: int, cap: int, mode: str, flip: torch.Tensor | None = None) -> torch.Tensor:
    """[B, out, cap] matrices that resize B signals of lengths ``n_in`` ([B] float, on the device;
    stored in the first ``n_in`` of ``cap`` entries) to ``out`` samples as
    ``F.interpolate(mode, antialias=True)`` does (``nearest``: torch's legacy nearest), the rows of
    images in ``flip`` in reverse order. Built on the device from the sizes: nothing is read back."""
    n = n_in.float().view(-1, 1, 1)
    i = torch.arange(out, device=n_in.device, dtype=torch.float32).view(1, -1, 1)
    if flip is not None:
        i = torch.where(flip.bool().view(-1, 1, 1), out - 1 - i, i)
    j = torch.arange(cap, device=n_in.device, dtype=torch.float32).view(1, 1, -1)
    scale = n / out
    if mode == "nearest":
        return (j == torch.minimum(torch.floor(i * scale), n - 1)).float()
    # torch's _compute_weights_aa: taps xmin .. xmin + xsize - 1 around the centre, normalised.
    half = 1.0 if mode == "bilinear" else 2.0  # interp_size / 2
    support = torch.where(scale >= 1, half * scale, torch.full_like(scale, half))
    invscale = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    center = scale * (i + 0.5)
    lo = torch.trunc(center - support + 0.5).clamp(min=0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), n)
    w = _aa_filter((j - center + 0.5) * invscale, mode) * ((j >= lo) & (j < hi))
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total == 0, torch.ones_like(total), total)


def resized_crop_draws(
    sizes: list[tuple[int, int]], scale: Sequence[float], ratio: Sequence[float], hflip: float,
    generator: torch.Generator,
) -> tuple[list[tuple[int, int, int, int]], torch.Tensor]:
    """The draws of ``random_resized_crop`` for images of (height, width) ``sizes``, from the CPU
    ``generator``: ``_TRIES`` x 4 uniforms per image, then one flip uniform per image. Returns the
    crop boxes (top, left, height, width) and the flips (a CPU bool tensor)."""
    b = len(sizes)
    u = torch.rand(b, _TRIES, 4, generator=generator, dtype=torch.float64).tolist()
    flip = torch.rand(b, generator=generator) < hflip if hflip > 0 else torch.zeros(b, dtype=torch.bool)
    return [crop_params(h, w, scale, ratio, draws) for (h, w), draws in zip(sizes, u, strict=True)], flip


def random_resized_crop(
    images: list[torch.Tensor], size: int, scale: Sequence[float], ratio: Sequence[float], hflip: float,
    generator: torch.Generator, interpolation: str = "bilinear",
) -> torch.Tensor:
    """RandomResizedCrop(size, scale, ratio, antialias) + RandomHorizontalFlip(hflip) of uint8
    CHW images (any sizes, one device; a list or a [B, C, H, W] batch) into a float32
    [B, C, size, size] batch in 0-255 units: ``resized_crops`` of the ``resized_crop_draws``."""
    boxes, flip = resized_crop_draws([(int(i.shape[-2]), int(i.shape[-1])) for i in images], scale, ratio, hflip,
                                     generator)
    return resized_crops(images, boxes, flip, size, interpolation)


def resized_crops(images: list[torch.Tensor], boxes: list[tuple[int, int, int, int]], flip: torch.Tensor,
                  size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """The crops ``boxes`` (top, left, height, width) of uint8 CHW ``images`` resized to size x size,
    mirrored where ``flip`` (CPU bool [B]): float32 [B, C, size, size] in 0-255 units.

    The batch is resized at once (or, with an outsized photo in it, in groups of similar crop
    sizes, ``crop_groups``: memory stays bounded by the crops' and the output's pixels): each
    image's crop is copied into one uint8 batch (one copy per image: nvJPEG returns separate
    tensors), and resized by two batched matrix products with the weights of torch's
    antialiased bilinear/bicubic (or nearest) resize, the flip folded into the horizontal
    weights; float32 copies of at most ``multicrop_batched.CHUNK_BYTES``. Equal to
    ``F.interpolate(crop, antialias=True)`` per image up to float32 rounding (1e-3 of a grey
    level in the tests); the per-image path's uint8 resizes round to integers (data/augment/registry.py
    says how far apart the two are)."""
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        raise UserError(f"data.interpolation={interpolation} is not bilinear, bicubic or nearest")
    b, c, device = len(images), images[0].shape[0], images[0].device
    hs, ws, flips = send([torch.tensor([bx[2] for bx in boxes]), torch.tensor([bx[3] for bx in boxes]), flip], device)
    groups = crop_groups(boxes, size)
    if len(groups) == 1:
        out = _resize_crops(images, boxes, range(b), hs, ws, flips, size, interpolation)
    else:  # an outsized photo is resized on its own, not padded into every other image's buffer
        out = torch.empty(b, c, size, size, device=device)
        for group in groups:
            idx = torch.tensor(group, device=device)
            out[idx] = _resize_crops(images, boxes, group, hs[idx], ws[idx], flips[idx], size, interpolation)
    return out.clamp_(0, 255) if interpolation == "bicubic" else out  # bicubic overshoots, as Pillow/uint8 clamp


def crop_groups(boxes: list[tuple[int, int, int, int]], size: int, slack: float = 1.5) -> list[list[int]]:
    """The images of a batch in groups resized together: the crops of a group are padded to its
    largest height and width, so one 4000x3000 photo among 500x375 ones would make the buffer
    of every image 4000x3000 (1.8 GB at batch 64). Largest crop first, an image joins the
    current group while the padded buffer stays within ``slack`` x the group's real crop
    pixels, or within 16 output images per image (so ordinary batches stay one group). The
    buffers together then hold at most ``slack`` x the crops' pixels plus 16 x the output's."""
    order = sorted(range(len(boxes)), key=lambda k: boxes[k][2] * boxes[k][3], reverse=True)
    groups: list[list[int]] = []
    hmax = wmax = area = 0
    for k in order:
        h, w = boxes[k][2], boxes[k][3]
        if groups:
            n = len(groups[-1]) + 1
            padded = n * max(hmax, h) * max(wmax, w)
            if padded <= max(slack * (area + h * w), 16 * n * size * size):
                groups[-1].append(k)
                hmax, wmax, area = max(hmax, h), max(wmax, w), area + h * w
                continue
        groups.append([k])
        hmax, wmax, area = h, w, h * w
    return [sorted(g) for g in groups]


def _resize_crops(images: list[torch.Tensor] | torch.Tensor, boxes: list[tuple[int, int, int, int]],
                  group: Sequence[int], hs: torch.Tensor, ws: torch.Tensor, flips: torch.Tensor, size: int,
                  interpolation: str) -> torch.Tensor:
    """The crops ``boxes[k]`` of ``images[k]`` for k in ``group``, copied into one uint8 buffer
    of the group's largest crop and resized as a batch: float32 [len(group), C, size, size]."""
    c, device = images[group[0]].shape[0], images[group[0]].device
    hc, wc = max(boxes[k][2] for k in group), max(boxes[k][3] for k in group)
    crops = torch.zeros(len(group), c, hc, wc, dtype=torch.uint8, device=device)
    for j, k in enumerate(group):
        top, left, h, w = boxes[k]
        crops[j, :, :h, :w] = images[k][:, top:top + h, left:left + w]
    wy = resize_weights(hs, size, hc, interpolation)  # [B, S, hc]
    wx = resize_weights(ws, size, wc, interpolation, flips).transpose(1, 2)  # [B, wc, S]
    n, per = len(group), max(1, multicrop_batched.CHUNK_BYTES // max(1, c * hc * wc * 4))
    return torch.cat([wy[i:i + per, None] @ crops[i:i + per].float() @ wx[i:i + per, None] for i in range(0, n, per)])


class BatchResizedCropFlip:
    """data.augment=imagenet a batch at a time: RandomResizedCrop + flip with the config's size,
    scale, flip probability and interpolation (``resized_crop_draws``, ``resized_crops``); uint8
    CHW images of any sizes (a list, or a [B, C, H, W] batch) in, float32 out."""

    def __init__(self, d: DataConfig):
        self.size, self.scale, self.hflip = d.image_size, tuple(d.crop_scale), d.hflip
        self.interpolation = d.interpolation

    def draw(self, images: list[torch.Tensor] | torch.Tensor, generator: torch.Generator) -> tuple:
        """(crop boxes, flips) of the images, from the CPU ``generator``."""
        sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        return resized_crop_draws(sizes, self.scale, RATIO, self.hflip, generator)

    def apply(self, images: list[torch.Tensor] | torch.Tensor, draws: tuple) -> torch.Tensor:
        """The crops and flips ``draws`` describe."""
        boxes, flip = draws
        return resized_crops(images, boxes, flip, self.size, self.interpolation)


class BatchPadCropFlip:
    """data.augment=cifar a batch at a time: zero padding, a uniformly placed crop and a flip per
    image (``crop_flip_draws``, ``crop_flip``) of a [B, C, H, W] batch, in its dtype."""

    def __init__(self, d: DataConfig):
        self.size, self.padding, self.hflip = d.image_size, d.crop_padding, d.hflip

    def draw(self, x: torch.Tensor, generator: torch.Generator) -> tuple:
        """(tops, lefts, flips) of the batch, from the CPU ``generator``."""
        b, _, h, w = x.shape
        return crop_flip_draws(b, h, w, self.size, self.padding, self.hflip, generator)

    def apply(self, x: torch.Tensor, draws: tuple) -> torch.Tensor:
        """The crops and flips ``draws`` describe."""
        return crop_flip(x, self.size, self.padding, *draws)


class BatchStored:
    """data.augment=none a batch at a time: the images as stored."""

    def __init__(self, d: DataConfig):
        pass

    def draw(self, x: torch.Tensor, generator: torch.Generator) -> None:
        """Nothing to draw."""
        return None

    def apply(self, x: torch.Tensor, draws: None) -> torch.Tensor:
        """The batch itself."""
        return x


class BatchAugment:
    """Images on the device (a uint8 [B, C, H, W] batch, or decoded images of many sizes) → the
    normalised training batch: the preset's crop and flip (``crop``; None: the images as they are,
    stacked), then RandAugment when the recipe has one, then the normalisation (data.normalize)
    and the memory format. Every draw comes from the CPU ``generator``, the crop's first
    (``draw``); ``apply`` takes them (the seam where the per-image path's draws are replayed)."""

    def __init__(self, crop: Any | None, randaugment: Any | None, normalize: Normalize,
                 device: torch.device, memory_format: torch.memory_format = torch.contiguous_format):
        self.crop, self.randaugment, self.normalize = crop, randaugment, normalize
        self._stats = normalize.on(device)
        self.memory_format = memory_format

    def __call__(self, images: list[torch.Tensor] | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if len(images) == 0:
            return torch.empty(0)
        return self.apply(images, self.draw(images, generator))

    def draw(self, images: list[torch.Tensor] | torch.Tensor, generator: torch.Generator) -> tuple:
        """(the crop's draws, RandAugment's) for ``images``, in that order from ``generator``."""
        crop = self.crop.draw(images, generator) if self.crop is not None else None
        ra = self.randaugment.sample_params(len(images), generator) if self.randaugment is not None else None
        return crop, ra

    def apply(self, images: list[torch.Tensor] | torch.Tensor, draws: tuple) -> torch.Tensor:
        """The normalised batch ``draws`` (from ``draw``) describe."""
        crop, ra = draws
        x = self.crop.apply(images, crop) if self.crop is not None else images
        x = x.float()
        if self.randaugment is not None:
            x = self.randaugment.apply(x, ra)
        return self.normalize(x, self._stats).contiguous(memory_format=self.memory_format)


class MultiCropAugment:
    """Decoded images (uint8 CHW, many sizes, on the device) → DINO's list of crop batches."""

    def __init__(self, d: DataConfig, dino: DinoConfig):
        self.multicrop = BatchedMultiCrop(d, dino)
        self.size = d.image_size

    def __call__(self, images: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        if not images:
            return []
        sizes = (torch.tensor([int(i.shape[-2]) for i in images]), torch.tensor([int(i.shape[-1]) for i in images]))
        return self.apply(images, self.multicrop.draw(len(images), images[0].shape[0], sizes, generator))

    def apply(self, images: list[torch.Tensor], draws: list[dict]) -> list[torch.Tensor]:
        """The crops ``draws`` (``BatchedMultiCrop.draw``) describe: the seam where another path's
        draws are replayed."""
        groups = crop_groups([(0, 0, int(i.shape[-2]), int(i.shape[-1])) for i in images], self.size)
        if len(groups) == 1:
            return self.multicrop.apply(pad_batch(images)[0], draws)
        # An outsized photo is padded on its own, not every image of the batch to its size.
        return self.multicrop.apply([(group, pad_batch([images[k] for k in group])[0]) for group in groups], draws)
