"""Model builders. ``build_model`` turns the model section of a config (plus the number of
classes the data has) into a network; checkpoints store exactly these arguments."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn
import torchvision

from visionzoo.errors import UserError
from visionzoo.models.cifar_resnet import cifar_resnet
from visionzoo.models.small_cnn import SmallCNN

if TYPE_CHECKING:
    from visionzoo.config import ModelConfig

# visionzoo's own architectures; torchvision and timm bring theirs through their registries.
VISIONZOO_MODELS = {
    "small_cnn": lambda nc, ic, drop, **kw: SmallCNN(nc, ic, drop_rate=drop, **kw),
    **{
        f"cifar_resnet{d}": (lambda nc, ic, drop, d=d, **kw: cifar_resnet(d, nc, ic, **kw))
        for d in (18, 34, 50, 101, 152)
    },
}


def model_args(model_cfg: ModelConfig, num_classes: int, in_chans: int) -> dict:
    """The constructor arguments of a model, as stored in checkpoints."""
    return {
        "name": model_cfg.name,
        "library": model_cfg.library,
        "num_classes": int(num_classes),
        "in_chans": int(in_chans),
        "drop_rate": float(model_cfg.drop_rate),
        "drop_path_rate": float(model_cfg.drop_path_rate),
        "kwargs": dict(model_cfg.kwargs),
        "vit_pos_embed": model_cfg.vit_pos_embed,
    }


def create(args: dict, pretrained: bool = False) -> nn.Module:
    """Build the network of ``model_args`` output: randomly initialised, or with timm's /
    torchvision's own pretrained weights (``pretrained``, see models/pretrained.py)."""
    name, lib, nc, ic = args["name"], args["library"], args["num_classes"], args["in_chans"]
    kwargs = dict(args.get("kwargs") or {})
    if lib == "visionzoo":
        if name not in VISIONZOO_MODELS:
            raise UserError(f"unknown visionzoo model '{name}' (have: {', '.join(VISIONZOO_MODELS)})")
        if pretrained:
            raise UserError(f"model.pretrained=true needs a timm or torchvision model; visionzoo's {name} has "
                            "no released weights (use model.weights=PATH)")
    try:
        if lib == "visionzoo":
            model = VISIONZOO_MODELS[name](nc, ic, args["drop_rate"], **kwargs)
        elif lib == "timm":
            model = _create_timm(args, kwargs, pretrained)
        else:
            model = _create_torchvision(args, kwargs, pretrained)
    except TypeError as err:  # e.g. the recipe's model.kwargs kept after model.name was changed
        if "unexpected keyword argument" not in str(err) or not kwargs:
            raise
        bad = str(err).rsplit("argument", 1)[-1].strip(" '\"")
        raise UserError(f"{lib} {name} takes no argument '{bad}' of model.kwargs={_flow(kwargs)} (the recipe's "
                        f"kwargs are for its own model: give {name}'s, e.g. model.kwargs={{}})") from None
    if args.get("vit_pos_embed", "timm") == "dino":  # checkpoints written before the key existed: timm's
        from visionzoo.models.vit_pos_embed import use_dino_pos_embed

        model = use_dino_pos_embed(model)
    return model


def _flow(value: dict) -> str:
    """A mapping as an override writes it: {width: 16}."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"


def _create_timm(args: dict, kwargs: dict, pretrained: bool) -> nn.Module:
    import timm

    name, nc = args["name"], args["num_classes"]
    if not timm.is_model(name):
        raise UserError(f"timm has no model '{name}'")
    if pretrained:
        from visionzoo.models.pretrained import timm_overlay

        kwargs["pretrained_cfg_overlay"] = timm_overlay(name)
    model = timm.create_model(
        name, pretrained=pretrained, num_classes=nc, in_chans=args["in_chans"],
        drop_rate=args["drop_rate"], drop_path_rate=args["drop_path_rate"], **kwargs,
    )
    if pretrained:
        from visionzoo.models.weights import say

        had = model.pretrained_cfg.get("num_classes")
        reinitialised = nc and had and nc != had
        note = f"; classifier re-initialised for {nc} classes (the weights have {had})" if reinitialised else ""
        say(f"timm's pretrained weights loaded into {name}{note}")
    return model


def _create_torchvision(args: dict, kwargs: dict, pretrained: bool) -> nn.Module:
    name, nc, ic = args["name"], args["num_classes"], args["in_chans"]
    if name not in torchvision.models.list_models():
        raise UserError(f"torchvision has no model '{name}'")
    if ic != 3:
        raise UserError(f"torchvision model '{name}' takes 3-channel images (data.in_chans={ic})")
    if args["drop_rate"] > 0:
        # The torchvision classifiers name their dropout argument differently.
        kwargs.setdefault("drop_rate" if name.startswith("densenet") else "dropout", args["drop_rate"])
    model = torchvision.models.get_model(name, weights=None, num_classes=nc, **kwargs)
    if pretrained:  # loaded here rather than by get_model, which refuses another class count
        from visionzoo.models.pretrained import load_torchvision_pretrained

        load_torchvision_pretrained(model, args)
    return model


def build_model(model_cfg: ModelConfig, num_classes: int, in_chans: int) -> tuple[nn.Module, dict]:
    """The network for a config's model section (with its initial weights: model.weights or
    model.pretrained), and its constructor arguments. (DINO training also takes the projection
    head of a DINO training checkpoint: see engine/dino.py build_dino_training.)"""
    args = model_args(model_cfg, num_classes, in_chans)
    net = create(args, pretrained=model_cfg.pretrained)
    if model_cfg.weights:
        from visionzoo.models.weights import load_weights

        load_weights(net, args, model_cfg.weights, model_cfg.checkpoint_key)
    return net, args
