"""Model builders. ``build_model`` turns the model section of a config (plus the number of
classes the data has) into a network; checkpoints store exactly these arguments."""

from __future__ import annotations

from typing import Any

import torch.nn as nn
import torchvision

from visionzoo.errors import UserError
from visionzoo.models.cifar_resnet import cifar_resnet
from visionzoo.models.small_cnn import SmallCNN

# visionzoo's own architectures; torchvision and timm bring theirs through their registries.
VISIONZOO_MODELS = {
    "small_cnn": lambda nc, ic, drop, **kw: SmallCNN(nc, ic, drop_rate=drop, **kw),
    **{
        f"cifar_resnet{d}": (lambda nc, ic, drop, d=d, **kw: cifar_resnet(d, nc, ic, **kw))
        for d in (18, 34, 50, 101, 152)
    },
}


def model_args(model_cfg: Any, num_classes: int, in_chans: int) -> dict:
    """The constructor arguments of a model, as stored in checkpoints."""
    return {
        "name": model_cfg.name,
        "library": model_cfg.library,
        "num_classes": int(num_classes),
        "in_chans": int(in_chans),
        "drop_rate": float(model_cfg.drop_rate),
        "drop_path_rate": float(model_cfg.drop_path_rate),
        "kwargs": dict(model_cfg.kwargs),
    }


def create(args: dict) -> nn.Module:
    """Build a randomly initialised network from ``model_args`` output."""
    name, lib, nc, ic = args["name"], args["library"], args["num_classes"], args["in_chans"]
    kwargs = dict(args.get("kwargs") or {})
    if lib == "visionzoo":
        if name not in VISIONZOO_MODELS:
            raise UserError(f"unknown visionzoo model '{name}' (have: {', '.join(VISIONZOO_MODELS)})")
        return VISIONZOO_MODELS[name](nc, ic, args["drop_rate"], **kwargs)
    if lib == "timm":
        import timm

        if not timm.is_model(name):
            raise UserError(f"timm has no model '{name}'")
        return timm.create_model(
            name, pretrained=False, num_classes=nc, in_chans=ic,
            drop_rate=args["drop_rate"], drop_path_rate=args["drop_path_rate"], **kwargs,
        )
    if name not in torchvision.models.list_models():
        raise UserError(f"torchvision has no model '{name}'")
    if ic != 3:
        raise UserError(f"torchvision model '{name}' takes 3-channel images (data.in_chans={ic})")
    if args["drop_rate"] > 0:
        # The torchvision classifiers name their dropout argument differently.
        kwargs.setdefault("drop_rate" if name.startswith("densenet") else "dropout", args["drop_rate"])
    return torchvision.models.get_model(name, weights=None, num_classes=nc, **kwargs)


def build_model(model_cfg: Any, num_classes: int, in_chans: int) -> tuple[nn.Module, dict]:
    """The network for a config's model section, and its constructor arguments."""
    args = model_args(model_cfg, num_classes, in_chans)
    return create(args), args
