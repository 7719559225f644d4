"""timm's RandAugment as batched tensor ops with per-sample random parameters.

Why: recipes with ``data.randaugment`` (NFNet's ``rand-m5-n4-mstd0.5-inc1``) run timm's
``RandAugment`` on one PIL image at a time in the DataLoader workers, which caps throughput once
JPEGs are decoded on the GPU (data/loading/device_decode.py). This module applies the same augmentation
to a whole float [B, C, H, W] batch on its device, after the crop and flip, before normalisation.

timm still parses the config string (``rand_augment_transform``); its op list, probabilities,
magnitudes and choice weights are read back, and each op follows timm's level -> argument rules
and Pillow's pixel semantics. Every random draw comes from a CPU generator, so a seed gives the
same augmentation on any device and nothing waits on the GPU. Known differences from timm + Pillow:

* Pillow rounds down (truncates) to uint8 after every op; here values stay float32 (blend and
  interpolation results are up to 1 level above Pillow's). The ops that work on uint8 levels
  (histograms, look-up tables, greyscale degenerate images) round their input first.
* bicubic resampling uses torch's cubic (a=-0.75) where Pillow's affine transform uses a=-1;
  nearest picks round(x - 0.5) where Pillow picks floor(x) (they differ only on exact ties).
* Posterize to 0 bits gives black (Pillow >= 10 raises ValueError, so timm would crash).
* GaussianBlur / GaussianBlurRand (the ``t3a`` / ``t3aw`` sets) are not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from visionzoo.data.augment.per_image import timm_randaugment  # the CPU path's exact timm set-up
from visionzoo.errors import UserError
from visionzoo.transfer import send

if TYPE_CHECKING:
    from visionzoo.config import DataConfig

_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude 10 is the "full strength" level
_GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}
_PIXEL = {
    "AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "PosterizeOriginal",
    "Solarize", "SolarizeIncreasing", "SolarizeAdd", "Color", "ColorIncreasing", "Contrast",
    "ContrastIncreasing", "Brightness", "BrightnessIncreasing", "Sharpness", "SharpnessIncreasing",
    "Desaturate",
}
SUPPORTED_OPS = frozenset(_GEOMETRIC | _PIXEL)
_MODES = ("bilinear", "bicubic", "nearest")


@dataclass
class RandAugmentParams:
    """The random draws of one batch, all on the CPU, shape [num_layers, B]: which op each layer
    picks (index into ``BatchedRandAugment.op_names``), whether it is applied, the magnitude
    (already clipped) and whether timm's 50% sign flip negates the argument."""

    op_index: torch.Tensor
    apply: torch.Tensor
    magnitude: torch.Tensor
    negate: torch.Tensor

    def select(self, idx: int | slice | torch.Tensor) -> RandAugmentParams:
        """The draws of the samples ``idx`` (an index or slice over B)."""
        return RandAugmentParams(*(t[:, idx] for t in (self.op_index, self.apply, self.magnitude, self.negate)))


def level_to_arg(name: str, magnitude: torch.Tensor, negate: torch.Tensor, hparams: dict) -> torch.Tensor:
    """timm's LEVEL_TO_ARG for a vector of magnitudes (float64, CPU), with the random sign given
    explicitly. Ops without an argument get zeros. Same operation order as timm, so the floats match."""
    m = magnitude.double()
    sign = torch.where(negate, -1.0, 1.0).double()
    if name == "Rotate":
        return sign * (m / _DENOM * 30.0)
    if name in ("ShearX", "ShearY"):
        return sign * (m / _DENOM * 0.3)
    if name in ("TranslateX", "TranslateY"):
        return sign * (m / _DENOM * float(hparams["translate_const"]))
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * (m / _DENOM * hparams.get("translate_pct", 0.45))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return m / _DENOM * 1.8 + 0.1
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return (1.0 + sign * (m / _DENOM * 0.9)).clamp(min=0.1)
    if name.startswith("Posterize"):
        bits = torch.trunc(m / _DENOM * 4)
        return {"Posterize": bits, "PosterizeIncreasing": 4 - bits, "PosterizeOriginal": bits + 4}[name]
    if name in ("Solarize", "SolarizeIncreasing"):
        thresh = torch.trunc(m / _DENOM * 256).clamp(max=256)
        return thresh if name == "Solarize" else 256 - thresh
    if name == "SolarizeAdd":
        return torch.trunc(m / _DENOM * 110).clamp(max=128)
    if name == "Desaturate":
        level = (0.5 + 0.5 * (m / _DENOM)).clamp(0.5, 1.0)
        return (1.0 - level).clamp(0.0, 1.0)  # a Color factor: 0 = grey
    return torch.zeros_like(m)


def _pil_affine(name: str, arg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[n, 3, 3] float64 maps from output to input pixel coordinates (pixel centres at i + 0.5),
    the ``data`` timm passes to Pillow's ``Image.transform(AFFINE)`` / ``Image.rotate``."""
    m = torch.eye(3, dtype=torch.float64).repeat(arg.numel(), 1, 1)
    if name == "ShearX":
        m[:, 0, 1] = arg
    elif name == "ShearY":
        m[:, 1, 0] = arg
    elif name == "TranslateX":
        m[:, 0, 2] = arg
    elif name == "TranslateY":
        m[:, 1, 2] = arg
    elif name == "TranslateXRel":
        m[:, 0, 2] = arg * w
    elif name == "TranslateYRel":
        m[:, 1, 2] = arg * h
    elif name == "Rotate":
        # Image.rotate: counter-clockwise by arg degrees about the centre (w/2, h/2).
        rad = -torch.deg2rad(torch.remainder(arg, 360.0))
        cos, sin = torch.cos(rad), torch.sin(rad)
        cx, cy = w / 2.0, h / 2.0
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, sin, -sin, cos
        m[:, 0, 2] = -cos * cx - sin * cy + cx
        m[:, 1, 2] = sin * cx - cos * cy + cy
    return m


def _theta(name: str, arg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[n, 2, 3] ``affine_grid`` matrices (align_corners=False) equal to Pillow's transform."""
    # Normalised coordinate u = 2 * p / size - 1 for pixel coordinate p (centres at i + 0.5).
    to_norm = torch.tensor([[2.0 / w, 0.0, -1.0], [0.0, 2.0 / h, -1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    to_pix = torch.linalg.inv(to_norm)
    return (to_norm @ _pil_affine(name, arg, h, w) @ to_pix)[:, :2, :]


def _levels(x: torch.Tensor) -> torch.Tensor:
    """The uint8 levels Pillow would see (kept as float)."""
    return x.round().clamp(0, 255)


def _grey(q: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L conversion of integer levels, [n, 1, H, W]; exact in float32 (< 2**24)."""
    if q.shape[1] == 1:
        return q
    r, g, b = q[:, 0:1], q[:, 1:2], q[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, x, factor) as ImageEnhance uses it, clipped, not truncated."""
    return (degenerate + factor * (x - degenerate)).clamp(0, 255)


def _apply_lut(q: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per (sample, channel) look-up: q [n, C, H, W] integer levels, lut [n, C, 256]."""
    out = lut.to(q.dtype).gather(2, q.long().flatten(2))
    return out.view_as(q)


def _equalize(q: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize per channel: histogram, step = (count - count of the top level) // 255,
    lut[i] = (step // 2 + pixels below level i) // step; step 0 leaves the channel alone."""
    n, c = q.shape[:2]
    levels = q.long().flatten(2)  # [n, C, HW]
    hist = torch.zeros(n, c, 256, dtype=torch.long, device=q.device)
    hist.scatter_add_(2, levels, torch.ones_like(levels))
    top = hist.gather(2, levels.amax(2, keepdim=True))  # count of the last non-empty bin
    step = (levels.shape[2] - top) // 255
    below = hist.cumsum(2) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    identity = torch.arange(256, device=q.device).expand_as(lut)
    return _apply_lut(q, torch.where(step > 0, lut, identity))


def _autocontrast(q: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast per channel: stretch [lo, hi] to [0, 255] with Pillow's float64
    lut int(i * scale + offset), so the rounding matches exactly."""
    lo = q.amin((2, 3)).double()[..., None]
    hi = q.amax((2, 3)).double()[..., None]
    # tensor / tensor: a Python scalar numerator would become reciprocal() * 255 (other rounding)
    scale = torch.full_like(lo, 255.0) / (hi - lo).clamp(min=1)
    offset = -lo * scale
    ramp = torch.arange(256, dtype=torch.float64, device=q.device)
    lut = torch.trunc(ramp * scale + offset).clamp(0, 255)
    return _apply_lut(q, torch.where(hi > lo, lut, ramp))


def _smooth(q: torch.Tensor) -> torch.Tensor:
    """ImageFilter.SMOOTH (3x3 [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded), border pixels kept."""
    h, w = q.shape[-2:]
    if h < 3 or w < 3:
        return q
    c = q.shape[1]
    k = torch.ones(3, 3, dtype=q.dtype, device=q.device)
    k[1, 1] = 5
    # Integer weights keep the sums exact (even under TF32); sum / 13 is never a rounding tie.
    total = F.conv2d(q, k.expand(c, 1, 3, 3), groups=c)
    out = q.clone()
    out[:, :, 1:-1, 1:-1] = (total / 13).round()
    return out


def _pixel_op(name: str, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """One colour op on x [n, C, H, W] with per-sample argument a [n, 1, 1, 1] (same device)."""
    base = name.removesuffix("Increasing")
    if name == "Invert":
        return 255 - x
    if name == "AutoContrast":
        return _autocontrast(_levels(x))
    if name == "Equalize":
        return _equalize(_levels(x))
    if base.startswith("Posterize"):
        # Keep the top `a` bits: floor to a multiple of 2**(8 - bits); 8+ bits leave x untouched.
        d = torch.exp2(8 - a.clamp(min=0))
        return torch.where(a >= 8, x, torch.floor(_levels(x) / d) * d)
    if base == "Solarize":
        q = _levels(x)
        return torch.where(q < a, q, 255 - q)
    if name == "SolarizeAdd":
        q = _levels(x)
        return torch.where(q < 128, (q + a).clamp(max=255), q)
    if base == "Brightness":
        return _blend(torch.zeros_like(x), x, a)
    if base in ("Color", "Desaturate"):
        # Pillow's Color of a greyscale image blends it with itself: a no-op.
        return x if x.shape[1] == 1 else _blend(_grey(_levels(x)), x, a)
    if base == "Contrast":
        grey = _grey(_levels(x)).flatten(1).double()
        total = grey.sum(1)  # exact: integers in float64
        mean = torch.floor(total / torch.full_like(total, grey.shape[1]) + 0.5)  # int(ImageStat mean + 0.5)
        return _blend(mean.to(x.dtype).view(-1, 1, 1, 1), x, a)
    if base == "Sharpness":
        return _blend(_smooth(_levels(x)), x, a)
    raise AssertionError(name)


class BatchedRandAugment:
    """RandAugment of a float32 [B, C, H, W] batch in 0-255 units (C = 1 or 3), configured as
    ``transforms.timm_randaugment(config_str, image_size, mean, interpolation)`` configures timm.

    ``aug(x, generator)`` = ``aug.apply(x, aug.sample_params(B, generator))``; ``apply_op`` runs
    one op with given magnitudes and signs (to compare with timm's ``AugmentOp``)."""

    def __init__(self, config_str: str, image_size: int, mean: list[float], interpolation: str):
        if interpolation not in _MODES:
            raise UserError(f"RandAugment interpolation {interpolation!r} is not one of {', '.join(_MODES)}")
        try:
            ra = timm_randaugment(config_str, image_size, mean, interpolation)
        except (AssertionError, ValueError, KeyError) as e:
            raise UserError(f"cannot parse RandAugment config {config_str!r}: {e or type(e).__name__}") from None
        for op in ra.ops:
            if op.name not in SUPPORTED_OPS:
                raise UserError(f"RandAugment op {op.name} (from config {config_str!r}) has no batched "
                                f"version; use data.decode=cpu for it")
        self.config_str, self.mode = config_str, interpolation
        self.op_names = [op.name for op in ra.ops]
        self.num_layers = ra.num_layers
        self.hparams = ra.ops[0].hparams if ra.ops else {}
        self.fill = torch.tensor(self.hparams.get("img_mean", (128, 128, 128)), dtype=torch.float32)
        f64 = dict(dtype=torch.float64)
        self.prob = torch.tensor([op.prob for op in ra.ops], **f64)
        self.magnitude = torch.tensor([op.magnitude for op in ra.ops], **f64)
        self.magnitude_std = torch.tensor([getattr(op, "magnitude_std", 0.0) for op in ra.ops], **f64)
        # AugmentOp clips to [0, magnitude_max or 10].
        self.magnitude_max = torch.tensor([getattr(op, "magnitude_max", None) or _DENOM for op in ra.ops], **f64)
        self.choice_weights = None
        if ra.choice_weights is not None:
            self.choice_weights = torch.as_tensor(ra.choice_weights, **f64)
            if self.num_layers > int((self.choice_weights > 0).sum()):
                raise UserError(f"RandAugment config {config_str!r} draws {self.num_layers} distinct ops "
                                f"from {int((self.choice_weights > 0).sum())}")

    @classmethod
    def of(cls, d: DataConfig) -> BatchedRandAugment:
        """The RandAugment data.randaugment configures, as per_image.randaugment_of configures timm's."""
        return cls(d.randaugment, d.image_size, d.mean, d.interpolation)

    def sample_params(self, batch_size: int, generator: torch.Generator) -> RandAugmentParams:
        """Every random draw of one batch, from the CPU ``generator``, in a fixed order."""
        layers, b, k = self.num_layers, batch_size, len(self.op_names)
        f64 = dict(generator=generator, dtype=torch.float64)
        if self.choice_weights is None:
            # np.random.choice(ops, n, replace=True): independent uniform picks.
            op_index = torch.randint(k, (layers, b), generator=generator)
        else:
            # Weighted picks without replacement (timm): Gumbel top-k gives the same distribution
            # as drawing one at a time with the remaining weights renormalised.
            gumbel = -torch.log(-torch.log(torch.rand(b, k, **f64)))
            op_index = torch.topk(self.choice_weights.log() + gumbel, layers, dim=1).indices.T.contiguous()
        u_apply = torch.rand(layers, b, **f64)
        normal = torch.randn(layers, b, **f64)
        uniform = torch.rand(layers, b, **f64)
        negate = torch.rand(layers, b, **f64) > 0.5  # timm: -v if random.random() > 0.5
        prob, mag, std = self.prob[op_index], self.magnitude[op_index], self.magnitude_std[op_index]
        apply = (prob >= 1) | (u_apply <= prob)  # timm skips when prob < 1 and random() > prob
        gauss = mag + torch.where(torch.isinf(std), 0.0, std) * normal
        sampled = torch.where(torch.isinf(std), uniform * mag, torch.where(std > 0, gauss, mag))
        sampled = torch.minimum(sampled, self.magnitude_max[op_index]).clamp(min=0)
        return RandAugmentParams(op_index, apply, sampled, negate)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment x (float [B, C, H, W], 0-255, any device) with draws from the CPU generator."""
        return self.apply(x, self.sample_params(x.shape[0], generator))

    def apply(self, x: torch.Tensor, params: RandAugmentParams) -> torch.Tensor:
        """The augmentation ``params`` describe, layer after layer; x is not modified."""
        self._check(x)
        out = x.clone()
        layers = []
        for layer in range(self.num_layers):
            ops, on = params.op_index[layer], params.apply[layer]
            groups = []
            for k, name in enumerate(self.op_names):
                idx = torch.nonzero(on & (ops == k)).flatten()  # host tensors: no device sync
                if idx.numel():
                    groups.append((name, idx, params.magnitude[layer, idx], params.negate[layer, idx]))
            layers.append(groups)
        self._run(out, layers)
        return out.clamp_(0, 255)  # the contract, even for input slightly outside [0, 255]

    def apply_op(self, x: torch.Tensor, name: str, magnitude: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
        """One op on every sample of x with per-sample CPU ``magnitude`` and ``negate`` [B]
        (as timm's ``AugmentOp(name, prob=1.0)`` with that magnitude and sign); x is not modified."""
        if name not in SUPPORTED_OPS:
            raise UserError(f"RandAugment op {name} has no batched version")
        self._check(x)
        out = x.clone()
        self._run(out, [[(name, torch.arange(x.shape[0]), magnitude, negate)]])
        return out.clamp_(0, 255)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise UserError(f"BatchedRandAugment takes [B, C, H, W] batches with C = 1 or 3, got {tuple(x.shape)}")
        if self.fill.numel() not in (1, x.shape[1]):
            raise UserError(f"RandAugment fill colour {tuple(self.fill.tolist())} does not fit {x.shape[1]} channels")

    def _run(self, x: torch.Tensor, layers: list[list]) -> None:
        """Apply, layer after layer, (op name, CPU sample indices, magnitudes, signs) groups to
        disjoint samples of x in place: colour ops one group at a time, all geometric ones of a
        layer in one grid_sample. Every index and argument of the batch goes to the device in one
        asynchronous copy (float64: exact for indices and arguments); nothing is read back."""
        h, w = x.shape[-2:]
        plan, parts = [], [self.fill.double()]
        for groups in layers:
            pixel = [(n, i, level_to_arg(n, m, s, self.hparams)) for n, i, m, s in groups if n not in _GEOMETRIC]
            geo = [(n, i, level_to_arg(n, m, s, self.hparams)) for n, i, m, s in groups if n in _GEOMETRIC]
            plan.append(([(n, len(i)) for n, i, _ in pixel], bool(geo)))
            if pixel:
                parts += [torch.cat([i for _, i, _ in pixel]), torch.cat([a for _, _, a in pixel])]
            if geo:
                parts += [torch.cat([i for _, i, _ in geo]), torch.cat([_theta(n, a, h, w) for n, _, a in geo])]
        sent = iter(send(parts, x.device, torch.float64))
        fill = next(sent).float().view(1, -1, 1, 1)
        for pixel, geo in plan:
            if pixel:
                idx, args = next(sent).long(), next(sent).to(x.dtype)
                start = 0
                for name, n in pixel:
                    sel = idx[start:start + n]
                    x[sel] = _pixel_op(name, x[sel], args[start:start + n].view(-1, 1, 1, 1))
                    start += n
            if geo:
                idx, theta = next(sent).long(), next(sent).to(x.dtype)
                x[idx] = self._affine(x[idx], theta, fill)

    def _affine(self, x: torch.Tensor, theta: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """Pillow's affine transform: output pixels whose source point lies outside the image get
        the fill colour (a hard edge, as Pillow); inside, neighbours past the edge are clamped."""
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        inside = ((grid >= -1) & (grid < 1)).all(-1).unsqueeze(1)
        # Clamp: cubic overshoots (Pillow clips to uint8); bilinear can leave 255 by float error.
        out = F.grid_sample(x, grid, mode=self.mode, padding_mode="border", align_corners=False).clamp(0, 255)
        return torch.where(inside, out, fill)
