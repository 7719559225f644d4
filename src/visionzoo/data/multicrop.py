"""DINO's multi-crop augmentation and its loader (labels are loaded but never used).

Each image becomes 2 global crops (data.image_size px, scale dino.global_crops_scale) and
dino.local_crops_number local crops (dino.local_crop_size px, scale dino.local_crops_scale),
each flipped, colour-jittered, maybe greyed and blurred; the second global crop may also be
solarized. Probabilities follow the reference (BYOL's asymmetric recipe): blur 1.0 on global
crop 1, 0.1 on global crop 2, 0.5 on local crops; solarize 0.2 on global crop 2 only.

Per image, in DataLoader workers (data.decode=cpu): ``MultiCropTransform`` hands over uint8
crops, normalised a batch at a time on the training device (data/device_batches.py). On PIL
images (ImageFolder) it draws exactly what the torchvision v2 pipeline of these steps draws,
in the same order, but all of an image's draws before it is decoded (they depend on its size
only), so a JPEG is decoded at 1/2-1/8 of its size when every crop shrinks at least that much
(data.draft); it applies them with Pillow and torchvision's PIL kernels, and blurs with a
separable kernel (torchvision's 2-D one, factored: at most 1 grey level apart, on a few pixels
in 10^5). uint8 CHW tensors (CIFAR, MNIST-style IDX files) go through the v2 ops unchanged.
Solarization thresholds at 128 in 0-255 units. In-memory data sets and JPEGs decoded on the
device have a batched version (``BatchedMultiCrop``, below)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as TF1

from visionzoo.data.device_batches import DeviceBatches, stack_images
from visionzoo.data.samplers import sample_seed, train_indices
from visionzoo.data.transfer import send, to_device
from visionzoo.data.transforms import (
    PIL_RESAMPLE, Box, Normalize, draft, pil_to_uint8, random_resized_crop, resized_crop,
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
        self.normalize = Normalize(tuple(d.mean), tuple(d.std))

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


def collate_multicrop(batch: list) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Stack ``(crops, target)`` items into one batch per crop position; drop and count the
    None items (undecodable files). An all-bad batch gives an empty list of crops."""
    from visionzoo.data.folder import Unreadable

    good = [item for item in batch if item is not None]
    dropped = Unreadable(len(batch) - len(good), getattr(batch, "bad", ()))  # names from ImageFolder
    if not good:
        return [], torch.empty(0, dtype=torch.int64), dropped
    crops = [stack_images([item[0][i] for item in good]) for i in range(len(good[0][0]))]
    targets = torch.tensor([t for _, t in good], dtype=torch.int64)
    return crops, targets, dropped


def multicrop_loader(ds: Dataset, batch_size: int, workers: int, seed: int, rank: int = 0,
                     world_size: int = 1, pin_memory: bool = False,
                     device: torch.device | None = None) -> DeviceBatches:
    """A loader of ``(crops, targets, n_bad)`` batches on ``device`` (default: the CPU), crops
    normalised there, ``batch_size`` images per device, with the shared shard rule and
    per-sample seeded augmentation of data/samplers.py (call ``loader.set_epoch`` every epoch);
    the last partial batch is dropped."""
    from visionzoo.data.build import build_loader  # (build imports this module)

    return build_loader(ds, batch_size, workers, True, seed, rank, world_size, pin_memory, device,
                        collate_fn=collate_multicrop)


# ----------------------------------------------------------------------------- batched, on the device
# Images held in memory (MNIST, CIFAR) or decoded on the GPU (ImageFolder with data.decode=device)
# are augmented a whole batch at a time with tensor ops: per-image transforms cost ~1 ms per crop
# on a CPU core, as much as a small ViT's training step. The distribution is the per-image one's:
# per-image crop boxes, flips, jitter factors, jitter order, greyscale, blur sigma and solarize
# draws, all from a CPU generator (the same draws on any device, and no device sync to pick the
# images an op applies to). Crops resample with area averaging (roi_align) instead of
# antialiased bilinear/bicubic. On one channel saturation, hue and greyscale are identities.

def random_resized_boxes(n: int, h, w, scale: list[float], g: torch.Generator,
                         ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """[n, 4] boxes (x1, y1, x2, y2) in pixels, drawn as RandomResizedCrop.get_params does: area
    fraction U(scale), log aspect ratio uniform; first of ``tries`` that fits, else the whole
    image. ``h`` and ``w`` are the image size: numbers, or [n] tensors for images of many sizes."""
    h = torch.as_tensor(h, dtype=torch.float32).expand(n)[:, None]
    w = torch.as_tensor(w, dtype=torch.float32).expand(n)[:, None]
    area = torch.empty(n, tries).uniform_(scale[0], scale[1], generator=g) * h * w
    log_r = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    cw = torch.sqrt(area * torch.exp(log_r)).round()
    ch = torch.sqrt(area / torch.exp(log_r)).round()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    fits = ok.any(1)
    first = torch.where(fits, ok.float().argmax(1), torch.zeros(n, dtype=torch.long))
    cw = torch.where(fits, cw.gather(1, first[:, None])[:, 0], w[:, 0])
    ch = torch.where(fits, ch.gather(1, first[:, None])[:, 0], h[:, 0])
    x1 = (torch.rand(n, generator=g) * (w[:, 0] - cw + 1)).floor()
    y1 = (torch.rand(n, generator=g) * (h[:, 0] - ch + 1)).floor()
    return torch.stack([x1, y1, x1 + cw, y1 + ch], dim=1)


def gaussian_blur_batch(x: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """Blur every image of [B, C, H, W] with its own sigma (px; 0 leaves it unchanged), separable
    kernel of size k, reflect padding (as torchvision's GaussianBlur)."""
    b, c, h, w = x.shape
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    s = sigma.to(x.device, x.dtype).clamp(min=1e-6)[:, None]
    kern = torch.exp(-0.5 * (r[None] / s) ** 2)
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, k]
    y = F.pad(x.reshape(1, b * c, h, w), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kern[:, None, :, None], groups=b * c)
    y = F.conv2d(y, kern[:, None, None, :], groups=b * c)
    return y.reshape(b, c, h, w)


def grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of RGB [B, 3, H, W] as [B, 1, H, W] (torchvision's rgb_to_grayscale)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB [B, 3, H, W] (0-255) by ``shift`` [B] turns (ColorJitter's hue
    factor in [-0.5, 0.5]) through HSV; saturation and value are kept."""
    x = x / 255.0
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    flat = maxc == minc
    chroma = maxc - minc
    sat = chroma / torch.where(flat, torch.ones_like(maxc), maxc)
    div = torch.where(flat, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(flat, torch.zeros_like(hue), hue)
    hue = (hue / 6.0 + shift.to(x.device, x.dtype)[:, None, None]) % 1.0
    sector = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    sector = sector.long() % 6
    v = maxc
    p = (v * (1 - sat)).clamp(0, 1)
    q = (v * (1 - sat * frac)).clamp(0, 1)
    t = (v * (1 - sat * (1 - frac))).clamp(0, 1)
    # (r, g, b) per sector 0..5: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    table = torch.stack([torch.stack(c, 0) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    out = table.gather(0, sector[None, None].expand(1, 3, *sector.shape))[0]  # [3, B, H, W]
    return out.permute(1, 0, 2, 3) * 255.0


def _jitter_op(op: int, y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """ColorJitter's op ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue) with per-image factors."""
    if op == 3:
        return adjust_hue(y, f)
    f = f.to(y.device)[:, None, None, None]
    if op == 0:
        return (y * f).clamp(0, 255)
    mean = grey(y) if y.shape[1] == 3 else y
    if op == 1:  # contrast: blend with the mean grey level of the whole image
        return (f * y + (1 - f) * mean.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 255)
    return (f * y + (1 - f) * mean).clamp(0, 255)  # saturation: blend with the grey image


def pad_batch(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images of many sizes (CHW, one device) as one [B, C, Hmax + 1, Wmax + 1] batch of their
    dtype (uint8 for decoded JPEGs: a quarter of float32's memory), with their heights and widths
    ([B] CPU tensors). Image b sits at the top left; its last column and row are repeated once
    (roi_align's bilinear samples read one pixel past a crop's right and bottom edges, and must see
    the edge there, as on the image alone); the rest of the padding is zero and never read.

    One copy per image (nvJPEG returns separate tensors); the edges are repeated for the whole batch
    at once, with the sizes sent to the device in one asynchronous copy."""
    hs = torch.tensor([int(i.shape[-2]) for i in images])
    ws = torch.tensor([int(i.shape[-1]) for i in images])
    hmax, wmax, c = int(hs.max()), int(ws.max()), images[0].shape[0]
    dtypes = {i.dtype for i in images}
    dtype = dtypes.pop() if len(dtypes) == 1 else functools.reduce(torch.promote_types, dtypes)
    x = torch.zeros(len(images), c, hmax + 1, wmax + 1, dtype=dtype, device=images[0].device)
    for b, img in enumerate(images):
        x[b, :, :img.shape[-2], :img.shape[-1]] = img
    h_dev, w_dev = send([hs, ws], x.device, torch.int64)
    col = w_dev.view(-1, 1, 1, 1).expand(-1, c, hmax + 1, 1)
    x.scatter_(3, col, x.gather(3, col - 1))
    row = h_dev.view(-1, 1, 1, 1).expand(-1, c, 1, wmax + 1)
    x.scatter_(2, row, x.gather(2, row - 1))  # after the column: the corner is repeated too
    return x, hs, ws


# Crops are cut from float32 copies of at most this many bytes of the (uint8) batch at a time:
# 64 multi-megapixel photos would otherwise need gigabytes of float32 for one step.
CHUNK_BYTES = 256 << 20


class BatchedMultiCrop:
    """uint8 or float [B, C, H, W] batch (0-255) → the same list of crops as MultiCropTransform,
    normalised. ``sizes`` = (heights, widths) when the batch holds padded images of many sizes
    (``pad_batch``).

    Every random draw of the batch is made first on the CPU, in a fixed order (crop after crop:
    box, flip, jitter, greyscale, blur, solarize), and sent to the device in one asynchronous copy;
    then each crop size is cut from the batch with one roi_align per chunk of images (the float
    copy of a chunk is bounded by ``CHUNK_BYTES``), and the colour ops run on each crop batch.
    Nothing is read back from the device."""

    def __init__(self, d, dino):
        self.d, self.dino = d, dino
        self.mean = torch.tensor(d.mean, dtype=torch.float32)
        self.std = torch.tensor(d.std, dtype=torch.float32)

    def _draw(self, b: int, c: int, sizes, scale: list[float], blur_p: float, solarize_p: float,
              g: torch.Generator) -> dict:
        """One crop position's draws for ``b`` images (CPU tensors)."""
        dino = self.dino
        bc, cc, sc, hc = dino.color_jitter

        def factor(spread: float) -> torch.Tensor:  # ColorJitter's U(1 - s, 1 + s) per image
            return torch.empty(b).uniform_(max(0.0, 1 - spread), 1 + spread, generator=g)

        out = {"boxes": random_resized_boxes(b, *sizes, scale, g), "flip": torch.rand(b, generator=g) < self.d.hflip}
        out["factors"] = torch.stack([factor(bc), factor(cc)])
        if c == 1:  # brightness and contrast in a random order (the other two are identities)
            out["order"] = torch.rand(b, generator=g) < 0.5
            out["jitter"] = torch.rand(b, generator=g) < dino.color_jitter_p
        else:
            saturation = factor(sc)[None]
            hue = torch.empty(1, b).uniform_(-hc, hc, generator=g)
            out["factors"] = torch.cat([out["factors"], saturation, hue])
            order = torch.argsort(torch.rand(b, 4, generator=g), dim=1)  # a random permutation per image
            apply = torch.rand(b, generator=g) < dino.color_jitter_p
            spreads = (bc, cc, sc, hc)
            # (slot, op, rows): the images op `op` runs on in slot `slot`, chosen on the CPU.
            out["groups"] = [(slot, op, torch.nonzero(apply & (order[:, slot] == op))[:, 0])
                             for slot in range(4) for op in range(4) if spreads[op] != 0]
            out["grey"] = torch.rand(b, generator=g) < dino.grayscale_p
        sigma = torch.empty(b).uniform_(dino.blur_sigma[0], dino.blur_sigma[1], generator=g)
        out["sigma"] = torch.where(torch.rand(b, generator=g) < blur_p, sigma, torch.zeros(b))
        if solarize_p > 0:
            out["solarize"] = torch.rand(b, generator=g) < solarize_p
        return out

    def _colour(self, y: torch.Tensor, p: dict, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Flip, jitter, greyscale, blur, solarize and normalise one crop batch with its draws ``p``
        (device tensors, except the host-side ``groups`` sizes and ``blur`` flag)."""
        b, c, dino = y.shape[0], y.shape[1], self.dino
        y = torch.where(p["flip"].bool().view(b, 1, 1, 1), y.flip(-1), y)
        if c == 1:
            bf, cf = p["factors"][0].view(b, 1, 1, 1), p["factors"][1].view(b, 1, 1, 1)
            brightness = lambda t: (t * bf).clamp(0, 255)  # noqa: E731
            contrast = lambda t: (cf * t + (1 - cf) * t.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 255)  # noqa: E731
            jittered = torch.where(p["order"].bool().view(b, 1, 1, 1), contrast(brightness(y)), brightness(contrast(y)))
            y = torch.where(p["jitter"].bool().view(b, 1, 1, 1), jittered, y)
        else:
            for (_, op, _), rows in zip(p["groups"], p["rows"]):
                if rows is not None:
                    y[rows] = _jitter_op(op, y[rows], p["factors"][op][rows])
            y = torch.where(p["grey"].bool().view(b, 1, 1, 1), grey(y).expand(-1, 3, -1, -1), y)
        k = 2 * math.ceil(3 * dino.blur_sigma[1]) + 1
        k = max(1, min(k, size if size % 2 else size - 1))
        if k > 1 and p["blur"]:  # decided on the CPU draws: no device sync
            y = gaussian_blur_batch(y, p["sigma"], k)
        if "solarize" in p:
            y = torch.where(p["solarize"].bool().view(b, 1, 1, 1) & (y >= 128), 255 - y, y)
        return (y - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor, g: torch.Generator,
                 sizes: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
        d, dino = self.d, self.dino
        b, c, h, w = images.shape
        sizes = sizes if sizes is not None else (h, w)
        p1, p2, pl = dino.blur_p
        specs = [(d.image_size, dino.global_crops_scale, p1, 0.0),
                 (d.image_size, dino.global_crops_scale, p2, dino.solarize_p)]
        specs += [(dino.local_crop_size, dino.local_crops_scale, pl, 0.0)] * dino.local_crops_number
        draws = [self._draw(b, c, sizes, scale, blur, sol, g) for _, scale, blur, sol in specs]

        # Images per float32 chunk, and the roi_align boxes of every (chunk, crop size): image
        # indices relative to the chunk, crops of one size after each other.
        per = max(1, CHUNK_BYTES // max(1, c * h * w * 4))
        chunks = [(i, min(i + per, b)) for i in range(0, b, per)]
        by_size: dict[int, list[int]] = {}
        for j, (size, *_) in enumerate(specs):
            by_size.setdefault(size, []).append(j)
        parts, layout = [self.mean, self.std], []
        for i0, i1 in chunks:
            index = torch.arange(i1 - i0, dtype=torch.float32)[:, None]
            for size, js in by_size.items():
                parts.append(torch.cat([torch.cat([index, draws[j]["boxes"][i0:i1]], 1) for j in js]))
                layout.append((i0, i1, size, js))
        names = ("flip", "factors", "order", "jitter", "grey", "sigma", "solarize")
        for p in draws:
            parts += [p[n] for n in names if n in p] + [rows for _, _, rows in p.get("groups", []) if len(rows)]
        sent = iter(send(parts, images.device))  # float32: boxes, factors and indices are exact

        mean, std = next(sent), next(sent)
        pieces: list[list[torch.Tensor]] = [[] for _ in specs]
        for i0, i1, size, js in layout:
            rois = next(sent)
            cut = roi_align(images[i0:i1].float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1,
                            aligned=True)
            for n, j in enumerate(cut.chunk(len(js))):
                pieces[js[n]].append(j)
        crops = []
        for (size, *_), p, piece in zip(specs, draws, pieces):
            on_device = {n: next(sent) for n in names if n in p}
            on_device["groups"] = p.get("groups", [])
            on_device["rows"] = [next(sent).long() if len(rows) else None for _, _, rows in on_device["groups"]]
            # (the rows of an empty group were not sent: nothing is taken for them)
            on_device["blur"] = bool((p["sigma"] > 0).any())  # a host tensor: no device sync
            y = torch.cat(piece) if len(piece) > 1 else piece[0]
            crops.append(self._colour(y, on_device, size, mean, std))
        return crops


class InMemoryMultiCropLoader:
    """Multi-crop batches ``(crops, labels, 0)`` of a TensorImageDataset kept on
    ``device``, in the order of the shared shard rule (``samplers.train_indices``; call
    ``set_epoch``); the last partial batch is dropped."""

    def __init__(self, dataset, batch_size: int, device: torch.device, d, dino, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.images, self.labels = dataset.images.to(device), dataset.labels.to(device)
        self.batch_size, self.device, self.seed, self.rank, self.world_size = batch_size, device, seed, rank, world_size
        self.epoch, self.skip_batches = 0, 0
        self.augment = BatchedMultiCrop(d, dino)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order; ``skip_batches`` resumes after that many batches."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        return len(self.labels) // self.world_size // self.batch_size - self.skip_batches

    def __iter__(self):
        order = to_device(train_indices(len(self.labels), self.seed, self.epoch, self.rank, self.world_size),
                          self.device)
        for i in range(self.skip_batches, self.skip_batches + len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            # Each rank's batch i of the epoch draws its own augmentation.
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i * self.world_size + self.rank))
            yield self.augment(self.images[idx], g), self.labels[idx], 0
