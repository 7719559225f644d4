"""Supervised training augmentation of a whole batch at once, with tensor ops on the training
device: random crop + flip of in-memory splits (CIFAR, MNIST; loading/in_memory.py) and
RandomResizedCrop + flip (+ RandAugment) of images decoded on the device
(loading/device_decode.py); DINO's multi-crop views of decoded images (augment/multicrop_batched.py).

Random numbers come from a CPU generator, so a run draws the same crops on any device; they
travel to the device in one asynchronous copy (visionzoo/transfer.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from visionzoo.data.augment import multicrop_batched
from visionzoo.data.augment.batched_randaugment import BatchedRandAugment
from visionzoo.data.augment.multicrop_batched import BatchedMultiCrop, pad_batch
from visionzoo.data.augment.presets import Normalize, central_box
from visionzoo.errors import UserError
from visionzoo.transfer import send

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
_TRIES = 10  # crop draws before the central-crop fallback, as torchvision's get_params


def random_crop_flip(
    x: torch.Tensor, size: int, padding: int, hflip: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample random crop of ``size`` after zero padding, and random horizontal flip, of a
    [B, C, H, W] batch (any dtype). Offsets are uniform over every valid position."""
    b, _, h, w = x.shape
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))
    ph, pw = h + 2 * padding, w + 2 * padding
    dev = x.device
    oy = torch.randint(0, ph - size + 1, (b,), generator=generator)
    ox = torch.randint(0, pw - size + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < hflip if hflip > 0 else torch.zeros(b, dtype=torch.bool)
    oy, ox, flip = send([oy, ox, flip], dev, torch.int64)
    ar = torch.arange(size, device=dev)
    rows = (oy[:, None] + ar)[:, :, None]  # [B, S, 1]
    cols = (ox[:, None] + ar)[:, None, :]  # [B, 1, S]
    if hflip > 0:
        # A flipped crop reads its columns right to left.
        cols = torch.where(flip.bool()[:, None, None], cols.flip(-1), cols)
    batch_idx = torch.arange(b, device=dev)[:, None, None]
    out = x[batch_idx, :, rows, cols]  # [B, S, S, C]
    return out.permute(0, 3, 1, 2)


def crop_params(height: int, width: int, scale, ratio, u: list[list[float]]) -> tuple[int, int, int, int]:
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


def random_resized_crop(
    images: list[torch.Tensor], size: int, scale, ratio, hflip: float, generator: torch.Generator,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """RandomResizedCrop(size, scale, ratio, antialias) + RandomHorizontalFlip(hflip) of uint8
    CHW images (any sizes, one device) into a float32 [B, C, size, size] batch in 0-255 units.

    The draws come from the CPU ``generator`` (the same crops on any device): ``_TRIES`` x 4
    uniforms per image, then one flip uniform per image; the crop boxes are computed on the host.
    The batch is then resized at once (or, with an outsized photo in it, in groups of similar
    crop sizes, ``crop_groups``: memory stays bounded by the crops' and the output's pixels):
    each image's crop is copied into one uint8 batch
    (one copy per image: nvJPEG returns separate tensors), and resized by two batched matrix
    products with the weights of torch's antialiased bilinear/bicubic (or nearest) resize, the
    flip folded into the horizontal weights; float32 copies of at most ``multicrop_batched.CHUNK_BYTES``.
    Equal to ``F.interpolate(crop, antialias=True)`` per image up to float32 rounding (1e-3 of a
    grey level in the tests); torchvision's uint8 resize rounds to integers (within 1 level)."""
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        raise UserError(f"data.interpolation={interpolation} is not bilinear, bicubic or nearest")
    b, c, device = len(images), images[0].shape[0], images[0].device
    u = torch.rand(b, _TRIES, 4, generator=generator, dtype=torch.float64).tolist()
    flip = torch.rand(b, generator=generator) < hflip if hflip > 0 else torch.zeros(b, dtype=torch.bool)
    boxes = [crop_params(img.shape[-2], img.shape[-1], scale, ratio, draws) for img, draws in zip(images, u)]
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


def _resize_crops(images, boxes, group, hs, ws, flips, size: int, interpolation: str) -> torch.Tensor:
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


class SupervisedAugment:
    """Decoded images (uint8 CHW, many sizes, on the device) → the normalised training batch:
    RandomResizedCrop + flip, then RandAugment when the recipe has one."""

    def __init__(self, d, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format):
        self.size, self.scale, self.hflip, self.interpolation = d.image_size, tuple(d.crop_scale), d.hflip, d.interpolation
        self.normalize = Normalize.of(d)  # in the reference's order (data.normalize)
        self._stats = self.normalize.on(device)
        self.memory_format = memory_format
        self.randaugment = BatchedRandAugment(d.randaugment, d.image_size, d.mean, d.interpolation) if d.randaugment else None

    def __call__(self, images: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        if not images:
            return torch.empty(0)
        x = random_resized_crop(images, self.size, self.scale, RATIO, self.hflip, generator, self.interpolation)
        if self.randaugment is not None:
            x = self.randaugment(x, generator)
        return self.normalize(x, self._stats).contiguous(memory_format=self.memory_format)


class MultiCropAugment:
    """Decoded images (uint8 CHW, many sizes, on the device) → DINO's list of crop batches."""

    def __init__(self, d, dino):
        self.multicrop = BatchedMultiCrop(d, dino)
        self.size = d.image_size

    def __call__(self, images: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        if not images:
            return []
        groups = crop_groups([(0, 0, int(i.shape[-2]), int(i.shape[-1])) for i in images], self.size)
        if len(groups) == 1:
            x, heights, widths = pad_batch(images)
            return self.multicrop(x, generator, (heights, widths))
        # An outsized photo is padded on its own, not every image of the batch to its size.
        sizes = (torch.tensor([int(i.shape[-2]) for i in images]), torch.tensor([int(i.shape[-1]) for i in images]))
        padded = [(group, pad_batch([images[k] for k in group])[0]) for group in groups]
        return self.multicrop(padded, generator, sizes)
