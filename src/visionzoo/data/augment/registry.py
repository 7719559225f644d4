"""The augmentation presets, and which path runs each of them: one table.

A training batch is augmented on one of three paths, chosen by the data and the config:

- per image: in DataLoader workers, one PIL image (ImageFolder, shards; data.decode=cpu) or one
  uint8 tensor (CIFAR / MNIST with data.device_resident=false) at a time. The reference: the
  other paths are compared with it.
- device decode: JPEGs decoded on the training device (data.decode=device), augmented there a
  batch at a time.
- in memory: CIFAR / MNIST splits kept on the training device (data.device_resident=true),
  augmented there a batch at a time.

A config's training augmentation is one preset, the value of data.augment, followed by
RandAugment when data.randaugment is set; for DINO (task: dino) it is the multi-crop views alone.
``PRESETS`` names, for each of them, the function that runs it on each path, and how close each
batched path comes to the per-image path when both are given the same random draws (crop boxes,
flips, RandAugment ops and magnitudes, the views' colour draws): bit-identical, or within a
stated number of grey levels, for a stated reason. tests/test_augment_registry.py checks every
claim; docs/data-path.md shows the table (``markdown_table``, checked by the same test).

To add a preset: a per-image step in per_image.py (a class taking the data config, with an
``apply`` that takes its draws), a batched one in batched.py if a batched path should run it,
a row here, the value in config.AUGMENTS, and a comparison in tests/test_augment_registry.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from visionzoo.data.augment.batched import (
    BatchAugment,
    BatchPadCropFlip,
    BatchResizedCropFlip,
    BatchStored,
    MultiCropAugment,
)
from visionzoo.data.augment.batched_randaugment import BatchedRandAugment
from visionzoo.data.augment.multicrop import MultiCropTransform
from visionzoo.data.augment.multicrop_batched import BatchedMultiCrop
from visionzoo.data.augment.normalize import Normalize
from visionzoo.data.augment.per_image import PadCropFlip, PerImageAugment, ResizedCropFlip, Stored, randaugment_of
from visionzoo.errors import UserError

if TYPE_CHECKING:
    from visionzoo.config import DataConfig, DinoConfig

PER_IMAGE, DEVICE_DECODE, IN_MEMORY = "per image", "device decode", "in memory"
# The settings that put a training split on each path.
PATHS = {
    PER_IMAGE: "data.decode=cpu, data.device_resident=false",
    DEVICE_DECODE: "data.decode=device",
    IN_MEMORY: "data.device_resident=true",
}


@dataclass(frozen=True)
class Impl:
    """One path's implementation of a preset: ``build(data config[, dino config])`` makes it.
    How close it comes to the per-image path given the same draws, in grey levels (0-255):
    ``tolerance`` bounds every pixel's difference (0: bit-identical); where no useful bound per
    pixel holds, ``mean`` bounds the mean difference over each image (each crop) instead.
    ``reason``: why the two can differ."""

    build: Callable[..., Any]
    tolerance: float = 0.0
    mean: float | None = None
    reason: str = ""

    @property
    def name(self) -> str:
        """The function the table names: module.qualname, within data/augment/."""
        module = self.build.__module__.rsplit(".", 1)[-1]
        return f"{module}.{self.build.__qualname__}"

    @property
    def agreement(self) -> str:
        """How close to the per-image path, in words."""
        if self.mean is not None:
            return f"≤ {self.mean:g} level{'s' * (self.mean != 1)} on average"
        return "exact" if self.tolerance == 0 else f"≤ {self.tolerance:g} level{'s' * (self.tolerance != 1)}"


@dataclass(frozen=True)
class Preset:
    """One row: ``setting`` selects it; ``paths`` maps every path that runs it to its
    implementation (a path missing does not run it: the loaders refuse it). A ``modifier``
    follows the preset of data.augment (RandAugment) or replaces it (DINO's views)."""

    name: str
    setting: str
    summary: str
    paths: dict[str, Impl] = field(default_factory=dict)
    modifier: bool = False


# Why the batched paths are not bit-identical (the test of each claim says more).
_RESIZE = ("resized in float32 by two matrix products (torch's antialiased kernels); the per-image path "
           "resizes uint8 (Pillow, torchvision), rounding each pass to integers and clipping a bicubic "
           "first pass. Bilinear and bicubic on photo-like images; nearest: exact against uint8 tensors, "
           "other pixels than Pillow's")
_RANDAUGMENT = ("one op on the same uint8 image: with bilinear within 1 level per pixel (Pillow truncates to "
                "uint8, the batched ops keep float32); bicubic rotate/shear/translate resample with torch's cubic "
                "(a = -0.75; Pillow's a = -1). Ops that threshold levels (Posterize, Solarize, Equalize) can turn "
                "an earlier op's difference into a larger one, so the bound is per op")
_MULTICROP = ("crops resampled by roi_align (area sampling), not the antialiased resize; colour jitter, "
              "greyscale and blur in float32, not uint8 (PIL: hue in 8-bit HSV); photo-like images")

PRESETS: tuple[Preset, ...] = (
    Preset("imagenet", "data.augment=imagenet",
           "RandomResizedCrop(data.image_size, data.crop_scale) + flip(data.hflip)",
           {PER_IMAGE: Impl(ResizedCropFlip),
            DEVICE_DECODE: Impl(BatchResizedCropFlip, 1.5, reason=_RESIZE),
            IN_MEMORY: Impl(BatchResizedCropFlip, 1.5, reason=_RESIZE)}),
    Preset("cifar", "data.augment=cifar",
           "zero padding (data.crop_padding) + random data.image_size crop + flip(data.hflip)",
           {PER_IMAGE: Impl(PadCropFlip), IN_MEMORY: Impl(BatchPadCropFlip)}),
    Preset("none", "data.augment=none", "the images as stored",
           {PER_IMAGE: Impl(Stored), IN_MEMORY: Impl(BatchStored)}),
    Preset("randaugment", "data.randaugment", "timm's RandAugment after the preset's crop",
           {PER_IMAGE: Impl(randaugment_of),
            DEVICE_DECODE: Impl(BatchedRandAugment.of, mean=1.0, reason=_RANDAUGMENT),
            IN_MEMORY: Impl(BatchedRandAugment.of, mean=1.0, reason=_RANDAUGMENT)}, modifier=True),
    Preset("multicrop", "task: dino",
           "DINO's global and local views, in place of data.augment and data.randaugment",
           {PER_IMAGE: Impl(MultiCropTransform),
            DEVICE_DECODE: Impl(MultiCropAugment, mean=3.0, reason=_MULTICROP),
            IN_MEMORY: Impl(BatchedMultiCrop, mean=3.0, reason=_MULTICROP)}, modifier=True),
)
BY_NAME = {p.name: p for p in PRESETS}
AUGMENTS = tuple(p.name for p in PRESETS if not p.modifier)  # data.augment's values (config.AUGMENTS)


def pipeline(d: DataConfig, views: bool = False) -> list[Preset]:
    """The presets a config's training augmentation is made of, in order: DINO's multi-crop views
    alone (``views``), else data.augment, then RandAugment when data.randaugment is set."""
    if views:
        return [BY_NAME["multicrop"]]
    return [BY_NAME[d.augment]] + ([BY_NAME["randaugment"]] if d.randaugment else [])


def check(d: DataConfig, path: str, views: bool = False) -> None:
    """Refuse, in one line naming the paths that run it, a training augmentation ``path`` does
    not implement."""
    for preset in pipeline(d, views):
        if path not in preset.paths:
            runs = ", ".join(f"{p} ({PATHS[p]})" for p in preset.paths)
            raise UserError(f"{preset.setting} has no {path} version ({PATHS[path]}); the paths that run it: {runs}")


def per_image(d: DataConfig) -> PerImageAugment:
    """The per-image training transform of a DataConfig (presets.train_transform)."""
    check(d, PER_IMAGE)
    augment, *rest = pipeline(d)
    randaugment = rest[0].paths[PER_IMAGE].build(d) if rest else None
    return PerImageAugment(augment.paths[PER_IMAGE].build(d), randaugment, Normalize.of(d))


def batched(d: DataConfig, path: str, device: torch.device,
            memory_format: torch.memory_format = torch.contiguous_format) -> BatchAugment:
    """The batch-at-a-time training augmentation of a DataConfig on ``path`` (device decode or in
    memory), ending in the normalised batch; a user error when ``path`` does not run it."""
    check(d, path)
    augment, *rest = pipeline(d)
    randaugment = rest[0].paths[path].build(d) if rest else None
    return BatchAugment(augment.paths[path].build(d), randaugment, Normalize.of(d), device, memory_format)


def multicrop(d: DataConfig, dino: DinoConfig, path: str) -> Callable:
    """DINO's multi-crop views on ``path``: the per-image transform, or the batched augmentation
    (device decode: decoded images of many sizes; in memory: a [B, C, H, W] batch)."""
    check(d, path, views=True)
    return BY_NAME["multicrop"].paths[path].build(d, dino)


def only_normalize(d: DataConfig, device: torch.device,
                   memory_format: torch.memory_format = torch.contiguous_format) -> BatchAugment:
    """No augmentation (evaluation, synthetic data): the normalisation and memory format alone."""
    return BatchAugment(None, None, Normalize.of(d), device, memory_format)


def markdown_table() -> str:
    """The table of presets x paths as docs/data-path.md shows it: the function that runs each
    preset on each path, how close it comes to the per-image path given the same draws, and why."""
    reasons = list(dict.fromkeys(i.reason for p in PRESETS for i in p.paths.values() if i.reason))
    rows = ["| preset | selected by | " + " | ".join(f"{p} ({PATHS[p]})" for p in PATHS) + " |",
            "|" + "---|" * (len(PATHS) + 2)]
    for preset in PRESETS:
        cells = []
        for path in PATHS:
            impl = preset.paths.get(path)
            if impl is None:
                cells.append("—")
            elif path == PER_IMAGE:
                cells.append(f"`{impl.name}`")
            else:
                note = f" [{reasons.index(impl.reason) + 1}]" if impl.reason else ""
                cells.append(f"`{impl.name}`: {impl.agreement}{note}")
        rows.append(f"| {preset.name}: {preset.summary} | `{preset.setting}` | " + " | ".join(cells) + " |")
    return "\n".join(rows + [""] + [f"- [{k}] {r}." for k, r in enumerate(reasons, 1)]) + "\n"
