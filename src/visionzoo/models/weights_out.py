"""visionzoo's models out, in the layouts their users already load (``visionzoo export --format
hf|torchvision|dino|mmcls``): the other half of weights.py, which reads the same layouts in.

- ``hf``: a Hugging Face / timm model folder: ``config.json`` in timm's layout (architecture,
  num_classes, label_names, model_args, and a ``pretrained_cfg`` with timm's preprocessing keys),
  ``model.safetensors`` (visionzoo's metadata in its header too, so ``visionzoo.load(FOLDER)``
  rebuilds any architecture) and the model card ``README.md`` (model_card.py);
- ``torchvision``: the bare state dict ``torchvision.models.<arch>(num_classes=N)`` loads with
  ``strict=True``, named ``<arch>-<sha256[:8]>.pth`` as torchvision names its downloads;
- ``dino``: a DINO run's teacher backbone as the released ``*_pretrain.pth`` (DINO's
  vision_transformer.py names: what hubconf.py loads strictly and ``utils.load_pretrained_weights``
  reads), and main_dino.py's training checkpoint (``student`` under DDP's ``module.``,
  ``teacher``, ``backbone.`` / ``head.``, the head's ``weight_g`` / ``weight_v``);
- ``mmcls``: an mmcls v0.24 ImageClassifier checkpoint (``state_dict`` with ``backbone.`` and
  ``head.fc.``, ``meta`` with ``CLASSES``) of a ResNet named as torchvision names it.

``unfit`` says why a layout cannot hold a model (the command refuses in one line); the writers
write atomically. Reading the files back is the command's check (commands/export.py)."""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from visionzoo.files import atomic_write, sha256_file, write_text

if TYPE_CHECKING:
    from visionzoo.config import DataConfig

# The formats and what each holds (the command's help and its refusals say this).
LAYOUTS = {
    "hf": "Hugging Face / timm folder with a model card",
    "torchvision": "torchvision state dict",
    "dino": "DINO *_pretrain.pth backbone",
    "mmcls": "mmcls v0.24 checkpoint",
}
HF_WEIGHTS, HF_CONFIG, HF_CARD, HF_RECIPE = "model.safetensors", "config.json", "README.md", "recipe.yaml"
MMCLS_RESNETS = re.compile(r"(cifar_)?resnet(18|34|50|101|152)$")  # visionzoo's and torchvision's names
# DINO's ViT (vision_transformer.py): the tensors of one block, after "blocks.N.".
DINO_BLOCK = tuple(f"{layer}.{p}" for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                   for p in ("weight", "bias"))
# visionzoo's DINOHead weight-norm parametrization and DINO's nn.utils.weight_norm names (weights.py reads back).
WEIGHT_NORM = {"last_layer.parametrizations.weight.original0": "last_layer.weight_g",
               "last_layer.parametrizations.weight.original1": "last_layer.weight_v"}


def dino_vit_keys(depth: int) -> list[str]:
    """The tensor names of DINO's VisionTransformer with ``depth`` blocks and no classifier (its
    released backbones): class token, position embeddings, patch projection, blocks, final norm."""
    blocks = [f"blocks.{i}.{k}" for i in range(depth) for k in DINO_BLOCK]
    return ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", *blocks,
            "norm.weight", "norm.bias"]


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors, detached, contiguous and on the CPU (what every layout stores)."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def pools_patch_tokens(model: nn.Module) -> bool:
    """Whether a timm ViT's feature pools its patch tokens (``global_pool`` avg, max, map, ...)
    instead of reading [CLS]: then the last block's [CLS] row feeds nothing."""
    pool = getattr(model, "global_pool", "token")
    return isinstance(pool, str) and pool not in ("token", "")


def unfit(fmt: str, model: nn.Module, args: dict, task: str) -> str | None:
    """Why layout ``fmt`` cannot hold ``model`` (built from ``args``, trained by ``task``), or None."""
    lib, name = args["library"], args["name"]
    if fmt == "torchvision" and lib != "torchvision":
        return "torchvision's layout is for torchvision's own architectures"
    if fmt == "dino":
        if task != "dino":
            return "DINO's layout is for the backbones of DINO runs, this is a classifier"
        if pools_patch_tokens(model):
            # DINO's ViT always returns [CLS]: this backbone's feature would be lost there, silently
            return f"DINO's ViT reads its [CLS] token, this backbone's feature pools its patch tokens " \
                   f"(global_pool {model.global_pool})"
        depth = len(getattr(model, "blocks", []))
        if sorted(model.state_dict()) != sorted(dino_vit_keys(depth)):
            return "DINO's layout is for ViTs with its tensors: class token, position embeddings, qkv biases, " \
                   "no registers"
    if fmt == "mmcls":
        if task == "dino" or args["num_classes"] < 1:
            return "mmcls's layout is for classifiers, this is a DINO backbone"
        if not (MMCLS_RESNETS.fullmatch(name) and lib == ("visionzoo" if name.startswith("cifar_") else "torchvision")):
            return "mmcls's layout is for ResNets: visionzoo cifar_resnet*, torchvision resnet*"
    return None


def fitting(model: nn.Module, args: dict, task: str, always: tuple[str, ...]) -> list[str]:
    """The formats that can hold the model: ``always`` (ONNX and the other graph formats) and the
    layouts ``unfit`` accepts."""
    return [*always, *(f for f in LAYOUTS if unfit(f, model, args, task) is None)]


# ----------------------------------------------------------------------------- hf

def _crop_pct(d: DataConfig) -> float:
    """timm's crop_pct for the eval resize/crop: timm resizes to floor(size / crop_pct), so the
    ratio is rounded down (6 decimals) to give test_resize exactly; 1.0 without a resize."""
    if d.test_resize <= 0:
        return 1.0
    return math.floor(d.test_size / d.test_resize * 1e6) / 1e6


def hf_config(model: nn.Module, args: dict, classes: list[str], d: DataConfig, size: int) -> dict:
    """config.json in timm's layout (what timm's ``save_for_hf`` writes and
    ``timm.create_model("local-dir:PATH")`` reads): the architecture and its arguments, the labels,
    and the evaluation preprocessing in ``pretrained_cfg`` (mean/std in 0-1 units). A timm
    model's own cfg gives first_conv, classifier and fixed_input_size."""
    own = dict(getattr(model, "pretrained_cfg", None) or {}) if args["library"] == "timm" else {}
    cfg = {
        "input_size": [args["in_chans"], size, size], "interpolation": d.interpolation,
        "crop_pct": _crop_pct(d), "crop_mode": "center",
        "mean": [m / 255 for m in d.mean], "std": [s / 255 for s in d.std], "num_classes": args["num_classes"],
        **{k: own[k] for k in ("first_conv", "classifier", "fixed_input_size") if k in own},
    }
    out: dict = {"architecture": args["name"], "library": args["library"], "num_classes": args["num_classes"]}
    if isinstance(getattr(model, "num_features", None), int):
        out["num_features"] = model.num_features
    if isinstance(getattr(model, "global_pool", None), str) and model.global_pool:
        out["global_pool"] = model.global_pool
    if classes and args["num_classes"] > 0:  # a DINO backbone's classes are its k-NN labels, not outputs
        out["label_names"] = list(classes)
    out["model_args"] = {**args.get("kwargs", {}), "in_chans": args["in_chans"], "num_classes": args["num_classes"]}
    out["pretrained_cfg"] = cfg
    return out


def write_hf(folder: Path, model: nn.Module, meta: dict, config: dict, recipe_yaml: str,
             card: Callable[[dict[str, str]], str]) -> list[Path]:
    """The model folder: config.json, model.safetensors (with visionzoo's metadata beside the
    Hub's ``format: pt``), recipe.yaml (the resolved recipe the card's command trains), then
    README.md, ``card`` of the other files' sha256s. Returns the files written."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = state_dict(model)
    header = {"format": "pt", "visionzoo": json.dumps(meta)}  # checkpoint.META_KEY: visionzoo.load reads it
    atomic_write(folder / HF_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=header))
    write_text(folder / HF_CONFIG, json.dumps(config, indent=2) + "\n")
    write_text(folder / HF_RECIPE, recipe_yaml)
    files = [folder / n for n in (HF_CONFIG, HF_WEIGHTS, HF_RECIPE)]
    write_text(folder / HF_CARD, card({p.name: sha256_file(p) for p in files}))
    return [*files, folder / HF_CARD]


# ----------------------------------------------------------------------------- single files

def torch_bytes(obj: Any) -> bytes:
    """``obj`` as torch.save writes it (into memory: the file name can then carry its hash)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_bytes(path: Path, data: bytes) -> None:
    """``data`` into ``path``, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def torchvision_layout(model: nn.Module) -> dict:
    """torchvision's state dict: visionzoo builds torchvision's modules, so its names (DenseNet's
    ``norm1``, not the ``norm.1`` of torchvision's oldest files) are torchvision's today."""
    return state_dict(model)


def dino_backbone_layout(model: nn.Module) -> dict:
    """The released ``*_pretrain.pth``: the bare backbone, DINO's ViT names (timm's are the same)."""
    sd = state_dict(model)
    return {k: sd[k] for k in dino_vit_keys(len(model.blocks))}


def _dino_network(sd: dict, prefix: str) -> dict:
    """One MultiCropWrapper's state in DINO's names: weight_g / weight_v for the head's last layer."""
    out = {}
    for k, v in sd.items():
        for ours, theirs in WEIGHT_NORM.items():
            k = k.replace(ours, theirs)
        out[prefix + k] = v.detach().contiguous().cpu()
    return out


def dino_training_layout(state: dict, args: dict) -> dict:
    """main_dino.py's ``checkpoint.pth`` from a visionzoo DINO training state: the student under
    DDP's ``module.`` (main_dino.py always wraps it), the teacher under ``module.`` only when the
    networks have BatchNorm (then the reference wraps it too), the loss centre, the optimizer
    (parameter groups as DINO's get_params_groups: weights, then biases and norms), the epoch
    count, and the fp16 scaler when there is one. ``args`` is a plain dict, not DINO's
    argparse.Namespace: torch.load(weights_only=True) reads it without allow-listing a class."""
    bn = any(k.endswith("running_mean") for k in state["student"])
    out = {"student": _dino_network(state["student"], "module."),
           "teacher": _dino_network(state["teacher"], "module." if bn else ""),
           "optimizer": state["optimizer"], "epoch": int(state["epoch"]), "args": args,
           "dino_loss": {k: v.cpu() for k, v in state["dino_loss"].items()}}
    scaler = state.get("grad_step", {}).get("scaler") or state.get("scaler")  # engine/step.py GradStep's
    if scaler:  # a disabled GradScaler's state is {}, which GradScaler.load_state_dict refuses
        out["fp16_scaler"] = scaler
    return out


def mmcls_layout(model: nn.Module, classes: list[str], extra_meta: dict) -> dict:
    """An mmcls v0.24 checkpoint (mmcv's save_checkpoint): ``state_dict`` with the backbone's
    tensors under ``backbone.`` (mmcls's ResNet names its layers as torchvision's) and the
    classifier under ``head.fc.`` (LinearClsHead), ``meta`` with ``CLASSES`` (mmcls 0.x's
    init_model reads it) and ``dataset_meta.classes`` (mmpretrain 1.x's). No time stamp, unlike
    mmcv's: the same weights give the same file, and so the same sha256 in its name."""
    sd = {(f"head.{k}" if k.startswith("fc.") else f"backbone.{k}"): v for k, v in state_dict(model).items()}
    meta = {"CLASSES": list(classes), "dataset_meta": {"classes": list(classes)}, **extra_meta}
    return {"meta": meta, "state_dict": sd}

