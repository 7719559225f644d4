"""DINO's multi-crop views of a whole batch at once, with tensor ops on the training device: images
held in memory (MNIST, CIFAR) or decoded on the device (ImageFolder with data.decode=device).
Images held in memory (MNIST, CIFAR) or decoded on the GPU (ImageFolder with data.decode=device)
are augmented a whole batch at a time with tensor ops: per-image transforms cost ~1 ms per crop
on a CPU core, as much as a small ViT's training step. The distribution is the per-image one's:
per-image crop boxes, flips, jitter factors, jitter order, greyscale, blur sigma and solarize
draws, all from a CPU generator (the same draws on any device, and no device sync to pick the
images an op applies to). Crops resample with area averaging (roi_align) instead of
antialiased bilinear/bicubic. On one channel saturation, hue and greyscale are identities."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from visionzoo.data.augment.normalize import Normalize
from visionzoo.transfer import send

if TYPE_CHECKING:
    from visionzoo.config import DataConfig, DinoConfig

# Images' (heights, widths): two numbers for a batch of one size, or two [B] tensors (pad_batch).
Sizes = tuple[int, int] | tuple[torch.Tensor, torch.Tensor]


def random_resized_boxes(n: int, h: float | torch.Tensor, w: float | torch.Tensor, scale: list[float],
                         g: torch.Generator,
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

    def __init__(self, d: DataConfig, dino: DinoConfig):
        self.d, self.dino = d, dino
        self.normalize = Normalize.of(d)  # in the reference's order (data.normalize), as every other path
        self._stats: dict[torch.device, tuple] = {}  # its constants on each device, sent once

    def _draw(self, b: int, c: int, sizes: Sizes, scale: list[float], blur_p: float, solarize_p: float,
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

    def _colour(self, y: torch.Tensor, p: dict, size: int, stats: tuple) -> torch.Tensor:
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
            for (_, op, _), rows in zip(p["groups"], p["rows"], strict=True):  # apply: one rows entry per group
                if rows is not None:
                    y[rows] = _jitter_op(op, y[rows], p["factors"][op][rows])
            y = torch.where(p["grey"].bool().view(b, 1, 1, 1), grey(y).expand(-1, 3, -1, -1), y)
        k = 2 * math.ceil(3 * dino.blur_sigma[1]) + 1
        k = max(1, min(k, size if size % 2 else size - 1))
        if k > 1 and p["blur"]:  # decided on the CPU draws: no device sync
            y = gaussian_blur_batch(y, p["sigma"], k)
        if "solarize" in p:
            y = torch.where(p["solarize"].bool().view(b, 1, 1, 1) & (y >= 128), 255 - y, y)
        return self.normalize(y, stats)

    def specs(self) -> list[tuple[int, list[float], float, float]]:
        """(size, scale, blur probability, solarize probability) of each crop position."""
        d, dino = self.d, self.dino
        p1, p2, pl = dino.blur_p
        specs = [(d.image_size, dino.global_crops_scale, p1, 0.0),
                 (d.image_size, dino.global_crops_scale, p2, dino.solarize_p)]
        return specs + [(dino.local_crop_size, dino.local_crops_scale, pl, 0.0)] * dino.local_crops_number

    def draw(self, b: int, c: int, sizes: Sizes, g: torch.Generator) -> list[dict]:
        """Every random draw of ``b`` images of ``c`` channels and (heights, widths) ``sizes``
        (numbers, or [b] tensors), crop position after crop position, from the CPU generator."""
        return [self._draw(b, c, sizes, scale, blur, sol, g) for _, scale, blur, sol in self.specs()]

    def __call__(self, images: torch.Tensor | list, g: torch.Generator,
                 sizes: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``images``: one batch, or a list of ``(image indices, padded batch of those images)``
        groups (an outsized photo padded on its own, device_decode.crop_groups); ``sizes``
        then holds every image's height and width in index order."""
        groups = images if isinstance(images, list) else [(None, images)]
        c, h, w = groups[0][1].shape[1:]
        b = sum(x.shape[0] for _, x in groups)
        return self.apply(images, self.draw(b, c, sizes if sizes is not None else (h, w), g))

    def apply(self, images: torch.Tensor | list, draws: list[dict]) -> list[torch.Tensor]:
        """The crops ``draws`` (from ``draw``) describe, of ``images`` as ``__call__`` takes them: the
        seam where another path's draws are replayed."""
        groups = images if isinstance(images, list) else [(None, images)]
        b = sum(x.shape[0] for _, x in groups)
        c = groups[0][1].shape[1]
        device = groups[0][1].device
        specs = self.specs()

        # Images per float32 chunk, and the roi_align boxes of every (chunk, crop size): image
        # indices relative to the chunk, crops of one size after each other.
        chunks = []  # (padded batch, first, stop, the images' indices in the batch's order)
        for index, x in groups:
            per = max(1, CHUNK_BYTES // max(1, c * x.shape[-2] * x.shape[-1] * 4))
            for i0 in range(0, x.shape[0], per):
                i1 = min(i0 + per, x.shape[0])
                chunks.append((x, i0, i1, list(index[i0:i1]) if index is not None else list(range(i0, i1))))
        by_size: dict[int, list[int]] = {}
        for j, (size, *_) in enumerate(specs):
            by_size.setdefault(size, []).append(j)
        parts, layout = [], []
        for x, i0, i1, rows in chunks:
            index = torch.arange(i1 - i0, dtype=torch.float32)[:, None]
            sel = torch.tensor(rows)
            for size, js in by_size.items():
                parts.append(torch.cat([torch.cat([index, draws[j]["boxes"][sel]], 1) for j in js]))
                layout.append((x, i0, i1, size, js))
        order = [r for *_, rows in chunks for r in rows]
        regroup = order != list(range(b))  # crops come out group by group: put them back in image order
        if regroup:
            parts.append(torch.argsort(torch.tensor(order)).float())
        names = ("flip", "factors", "order", "jitter", "grey", "sigma", "solarize")
        for p in draws:
            parts += [p[n] for n in names if n in p] + [rows for _, _, rows in p.get("groups", []) if len(rows)]
        sent = iter(send(parts, device))  # float32: boxes, factors and indices are exact

        if device not in self._stats:
            self._stats[device] = self.normalize.on(device)
        pieces: list[list[torch.Tensor]] = [[] for _ in specs]
        for x, i0, i1, size, js in layout:
            rois = next(sent)
            cut = roi_align(x[i0:i1].float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1,
                            aligned=True)
            for n, j in enumerate(cut.chunk(len(js))):
                pieces[js[n]].append(j)
        inverse = next(sent).long() if regroup else None
        crops = []
        for (size, *_), p, piece in zip(specs, draws, pieces, strict=True):  # one of each per crop position
            on_device = {n: next(sent) for n in names if n in p}
            on_device["groups"] = p.get("groups", [])
            on_device["rows"] = [next(sent).long() if len(rows) else None for _, _, rows in on_device["groups"]]
            # (the rows of an empty group were not sent: nothing is taken for them)
            on_device["blur"] = bool((p["sigma"] > 0).any())  # a host tensor: no device sync
            y = torch.cat(piece) if len(piece) > 1 else piece[0]
            y = y[inverse] if inverse is not None else y
            crops.append(self._colour(y, on_device, size, self._stats[device]))
        return crops
