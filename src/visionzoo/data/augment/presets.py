"""The train and eval preprocessing of every recipe (torchvision's ``presets.py`` role), per image.

Training: the preset data.augment names, then RandAugment when data.randaugment is set, as the
table of presets builds it for the per-image path (data/augment/registry.py; the batched paths
of in-memory and device-decoded data are built from the same table). Evaluation: resize the
short side to data.test_resize, centre-crop data.test_size. Both end in uint8 [C, H, W]; their
``.normalize`` is applied to the batch on the training device (data/loading/device_batches.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from visionzoo.data.augment import registry
from visionzoo.data.augment.per_image import ResizeCenterCrop, eval_size
from visionzoo.data.sources.folder import to_rgb

if TYPE_CHECKING:
    from visionzoo.config import DataConfig

__all__ = ["EvalInput", "eval_size", "eval_transform", "normalized", "train_transform"]


def train_transform(d: DataConfig) -> Callable:
    """Training augmentation for a DataConfig, per image, ending in uint8 (its ``.normalize`` is
    applied to the batch on the device): the preset's crop and flip, then RandAugment."""
    return registry.per_image(d)


def eval_transform(d: DataConfig) -> Callable:
    """Evaluation preprocessing, ending in uint8 (its ``.normalize`` is applied to the batch on
    the device): resize the short side to test_resize, centre-crop test_size (test_resize 0:
    images are used at their stored size, as for CIFAR and MNIST). JPEGs are decoded in full
    unless ``data.eval_draft``."""
    return ResizeCenterCrop(d, d.eval_draft)


def normalized(transform: Callable, img: Any) -> torch.Tensor:
    """One image through ``transform`` and its normalisation: the float [C, H, W] tensor a model
    takes (for callers outside a loader, e.g. predicting one file)."""
    return transform.normalize(transform(img))


class EvalInput:
    """One decoded image outside a loader (``visionzoo infer`` on image files,
    ``visionzoo.predict``) as the model's float [C, H, W] input: grey (L) for 1-channel models
    (after ``to_rgb``, which scales 16-bit grey and composites alpha), else RGB, then the eval
    transform and its normalisation: the preprocessing ``visionzoo eval``'s loaders apply."""

    def __init__(self, d: DataConfig, in_chans: int):
        self.transform, self.in_chans, self.size = eval_transform(d), in_chans, eval_size(d)

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        """A PIL image (any mode) or a uint8 [C, H, W] tensor in, float [C, size, size] out."""
        if isinstance(img, Image.Image):
            img = to_rgb(img).convert("L") if self.in_chans == 1 else to_rgb(img)
        return normalized(self.transform, img)

    def resized(self, img: Image.Image | torch.Tensor) -> bool:
        """Whether ``img`` is resized only because it is not at the stored size of a recipe that
        evaluates at it (test_resize 0)."""
        shape = tuple(img.shape[-2:]) if isinstance(img, torch.Tensor) else (img.height, img.width)
        return self.transform.resize <= 0 and shape != (self.size, self.size)
