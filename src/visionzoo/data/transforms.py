"""The single definition of train and eval preprocessing for every recipe (torchvision's
``presets.py`` role). Images arrive as PIL images (ImageFolder) or uint8 CHW tensors (CIFAR,
IDX); both leave as float32 CHW tensors normalised with the config's mean/std in 0-255 units."""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def _to_normalised_tensor(mean: list[float], std: list[float]) -> list:
    # scale=False keeps 0-255 values: mean/std are written in pixel units.
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=False), v2.Normalize(mean, std)]


def timm_randaugment(config_str: str, image_size: int, mean: list[float], interp: str) -> Callable:
    """timm's RandAugment for PIL images, as every recipe configures it (the batched GPU version,
    data/batched_randaugment.py, reads its ops back from this object)."""
    from timm.data.auto_augment import rand_augment_transform

    hparams = {
        "translate_const": int(image_size * 0.45),  # timm's default translation, 45% of the crop
        "img_mean": tuple(int(round(m)) for m in mean),  # fill colour for shear/rotate/translate
        "interpolation": {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[interp],
    }
    return rand_augment_transform(config_str, hparams)


def train_transform(d) -> Callable:
    """Training augmentation for a DataConfig: crop, flip, optional RandAugment, normalise."""
    interp = _INTERP[d.interpolation]
    ops: list = []
    if d.augment == "imagenet":
        ops.append(v2.RandomResizedCrop(d.image_size, scale=tuple(d.crop_scale), interpolation=interp, antialias=True))
    elif d.augment == "cifar":
        ops.append(v2.RandomCrop(d.image_size, padding=d.crop_padding))
    if d.augment != "none" and d.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(d.hflip))
    if d.randaugment:
        # timm's RandAugment works on PIL images; tensor inputs make a round trip.
        ops += [v2.ToPILImage(), timm_randaugment(d.randaugment, d.image_size, d.mean, d.interpolation)]
    return v2.Compose(ops + _to_normalised_tensor(d.mean, d.std))


def eval_transform(d) -> Callable:
    """Evaluation preprocessing: resize the short side to test_resize, centre-crop test_size
    (test_resize 0: images are used at their stored size, as for CIFAR and MNIST)."""
    ops: list = []
    if d.test_resize > 0:
        ops += [
            v2.Resize(d.test_resize, interpolation=_INTERP[d.interpolation], antialias=True),
            v2.CenterCrop(d.test_size),
        ]
    return v2.Compose(ops + _to_normalised_tensor(d.mean, d.std))
