"""Released checkpoints into visionzoo's models (``--weights PATH``, ``model.weights=PATH``).

A file is read (safetensors, or a pickle through ``torch.load(weights_only=True)``), recognised,
and turned by one function per source format into a state dict named as the visionzoo model
names its tensors:

- visionzoo's own safetensors (a run's model.safetensors / best.safetensors);
- DINO: the released backbone-only ``*_pretrain.pth`` (timm's ViT names), and full training
  checkpoints (``teacher`` / ``student``, DDP ``module.`` prefixes, ``backbone.`` / ``head.``,
  the head's old-style weight norm ``weight_g`` / ``weight_v``), one network chosen by
  ``checkpoint_key`` as DINO's eval scripts do;
- timm and torchvision state dicts (.pth, .bin, .safetensors; bare, or under ``state_dict`` /
  ``model``), passed through timm's own checkpoint filter for timm models and torchvision's old
  DenseNet key layout for torchvision ones;
- mmcls / mmpretrain checkpoints (``state_dict`` with ``backbone.`` and ``head.fc.``).

``load_into`` then loads it: a classifier of another class count (or none) is left as the model
initialised it and the run says so (fine-tuning); any other missing, unexpected or reshaped
tensor is a UserError naming how many and the first few."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from visionzoo.errors import UserError, first_line

if TYPE_CHECKING:
    from visionzoo.config import ModelConfig

SHOWN = 4  # tensor names listed in a mismatch message
VISIONZOO_META = "visionzoo"  # the safetensors metadata key of visionzoo's checkpoints (checkpoint.META_KEY)


def say(message: str) -> None:
    """Print on the main process only (every rank builds and loads its own model)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"visionzoo: {message}", flush=True)


def _safe_globals() -> list:
    """Harmless classes released checkpoints pickle besides tensors: DINO's and timm's ``args``
    (argparse.Namespace), numpy scalars, arrays and dtypes in mmcls/timm metadata.

    Each is allowed under the name NumPy 2 pickles it with (``numpy._core...``) and the name
    NumPy 1.x wrote (``numpy.core...``: nearly every released training checkpoint). None of them
    runs code: ``scalar`` and ``_reconstruct`` build a number or an array from bytes, and any
    object inside one is unpickled under the same restrictions."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = {type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16,
                                          np.int8, np.uint8, np.bool_, np.str_, np.bytes_)}
    builders = [(core.multiarray.scalar, "scalar"), (core.multiarray._reconstruct, "_reconstruct")]
    return [argparse.Namespace, np.dtype, np.ndarray, *dtypes,
            *((f, f"numpy.{mod}.multiarray.{name}") for f, name in builders for mod in ("core", "_core")),
            *((d, f"numpy.dtypes.{d.__name__}") for d in dtypes)]


ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch's messages carry terminal colour codes


def _is_text(head: bytes) -> bool:
    """Whether the first bytes of a file are UTF-8 text (a cut-off last character allowed)."""
    try:
        chars = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:
            return False
        chars = head[:err.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\r\n" for c in chars)


def unreadable(p: Path, err: Exception) -> UserError:
    """One line for a file torch.load(weights_only=True) refused: what the file is (empty,
    text, truncated, holding objects that would run code, something else) and what to do."""
    text = ANSI.sub("", str(err))
    with open(p, "rb") as f:
        head = f.read(512)
    if not head:
        return UserError(f"{p} is empty, not a checkpoint: copy or download it again")
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        return UserError(f"{p} holds a pickled '{unsafe.group(1)}', which would run code from the file when "
                         f"loaded, so it is not read; if you trust the file, save its tensors alone (torch.save("
                         f"state_dict, 'weights.pth'), or a .safetensors file) and pass that")
    pickle_like = head.startswith((b"PK\x03\x04", b"\x80"))
    if pickle_like and (isinstance(err, EOFError) or any(
            w in text for w in ("central directory", "unexpected EOF", "truncated", "Ran out of input", "corrupted"))):
        return UserError(f"{p} is truncated or damaged ({p.stat().st_size} bytes): copy or download it again")
    if not pickle_like and _is_text(head):
        return UserError(f"{p} is a text file, not a checkpoint: pass a .pth/.pt/.bin/.safetensors weights file")
    if not pickle_like:
        return UserError(f"{p} is not a checkpoint: neither a PyTorch file (.pth/.pt/.bin) nor .safetensors")
    detail = text.split("WeightsUnpickler error:", 1)[-1]
    return UserError(f"{p} is a PyTorch file visionzoo cannot read: "
                     f"{first_line(Exception(detail)) if detail.strip() else type(err).__name__}")


def read_file(path: str | Path) -> tuple[Any, dict | None]:
    """The object a weights file holds, and visionzoo's metadata when it is a visionzoo
    checkpoint. Pickles load with ``weights_only=True``: no code in the file runs."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises several types for foreign or truncated files
            raise UserError(f"cannot read weights {p}: {first_line(err)}") from None
        return tensors, json.loads(meta[VISIONZOO_META]) if VISIONZOO_META in meta else None
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(p, map_location="cpu", weights_only=True), None
    except Exception as err:  # truncated files, foreign formats, classes weights_only refuses
        raise unreadable(p, err) from None


def _tensors(obj: Any, path: Path | str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state dict (a mapping of names to tensors) that visionzoo recognises")
    return obj


def _strip(sd: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in sd.items()}


# ----------------------------------------------------------------------------- source formats

def is_dino_training(obj: Any) -> bool:
    """A DINO training checkpoint (main_dino.py's checkpoint.pth, or a visionzoo DINO state file)."""
    return isinstance(obj, dict) and isinstance(obj.get("teacher"), dict) and isinstance(obj.get("student"), dict)


def is_mmcls(obj: Any) -> bool:
    """An mmcls / mmpretrain checkpoint: ``state_dict`` with the classifier's backbone./head. parts."""
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    return isinstance(sd, dict) and any(k.startswith("backbone.") for k in sd)


def from_dino_training(obj: dict, key: str, path: Path | str) -> tuple[dict, dict]:
    """(backbone, head) state dicts of network ``key`` (teacher | student) of a DINO training
    checkpoint, in visionzoo's names. The reference's head uses ``nn.utils.weight_norm``
    (``weight_g`` gain, ``weight_v`` direction); visionzoo's DINOHead the parametrization API,
    whose ``original0`` / ``original1`` are the same two tensors."""
    if key not in ("teacher", "student"):
        raise UserError(f"--checkpoint-key must be teacher or student, got {key!r}")
    sd = _strip(_tensors(obj[key], path), "module.")  # the student is DDP-wrapped in the reference
    backbone = {k.removeprefix("backbone."): v for k, v in sd.items() if not k.startswith("head.")}
    head = {}
    for k, v in sd.items():
        if k.startswith("head."):
            k = k.removeprefix("head.")
            k = {"last_layer.weight_g": "last_layer.parametrizations.weight.original0",
                 "last_layer.weight_v": "last_layer.parametrizations.weight.original1"}.get(k, k)
            head[k] = v
    return backbone, head


def from_mmcls(obj: dict, classifier: str | None) -> dict:
    """An mmcls / mmpretrain ImageClassifier's state dict in torchvision ResNet names: ``backbone.``
    dropped (mmcls's ResNet names its layers as torchvision's: conv1, bn1, layerN.M.conv1/bn1...,
    downsample.0/1), ``head.fc.`` becomes the model's classifier (``fc``)."""
    sd = _strip(_tensors(obj["state_dict"], "state_dict"), "module.")
    out = {}
    for k, v in sd.items():
        if k.startswith("backbone."):
            k = k.removeprefix("backbone.")
        elif k.startswith("head.fc.") and classifier:
            k = f"{classifier}.{k.removeprefix('head.fc.')}"
        out[k] = v
    return out


def from_state_dict(obj: Any, path: Path | str) -> dict:
    """A bare state dict, or one under ``state_dict`` / ``model`` (timm's train.py, DeiT-style
    files), without DDP's ``module.`` and DINO's ``backbone.`` prefixes (as DINO's
    load_pretrained_weights strips them)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    return _strip(_strip(_tensors(obj, path), "module."), "backbone.")


def from_timm(sd: dict, model: nn.Module) -> dict:
    """Through the ``checkpoint_filter_fn`` of the model's timm module, as timm's own pretrained
    loading does (it remaps other layouts and resamples patch/position embeddings)."""
    for cls in type(model).__mro__:
        module = sys.modules.get(cls.__module__)
        fn = getattr(module, "checkpoint_filter_fn", None) if cls.__module__.startswith("timm.") else None
        if fn is not None:
            return fn(sd, model)
    return sd


_DENSENET_OLD = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


def from_torchvision(sd: dict) -> dict:
    """torchvision's released DenseNet files name ``norm.1`` what the model calls ``norm1``
    (torchvision remaps them the same way when it loads its own weights)."""
    return {_DENSENET_OLD.sub(r"\1\2.", k): v for k, v in sd.items()}


# ----------------------------------------------------------------------------- loading

def classifier_name(model: nn.Module, args: dict) -> str | None:
    """The module name of the model's classifier: timm's pretrained_cfg says it (also for a
    feature extractor built with num_classes=0); otherwise the last Linear layer of a classifier."""
    if args["library"] == "timm":
        name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        return name[0] if isinstance(name, (tuple, list)) else name
    if args["num_classes"] <= 0:
        return None
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linear[-1] if linear else None


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (", ..." if len(keys) > SHOWN else "")


def load_into(model: nn.Module, sd: dict, args: dict, source: str, allow_new_classifier: bool = True) -> None:
    """Load ``sd`` into ``model``. The classifier may be absent from ``sd`` or of another class
    count (it then keeps the model's own initialisation: fine-tuning), or present in ``sd`` and
    absent from a feature extractor (dropped); both are said. Any other difference is one
    UserError line with the counts and the first names."""
    own = model.state_dict()
    cls = classifier_name(model, args)

    def in_cls(k: str) -> bool:
        return cls is not None and k.startswith(cls + ".")

    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    reshaped = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    bad = {what: [k for k in keys if not in_cls(k)]
           for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))}
    if any(bad.values()):
        parts = [f"{len(keys)} {what} ({_names(keys)})" for what, keys in bad.items() if keys]
        raise UserError(f"{source} does not fit {args['library']} {args['name']}: " + "; ".join(parts))
    new_cls = [k for k in missing + reshaped if in_cls(k)]
    if new_cls:
        w = sd.get(f"{cls}.weight")
        had = f"{w.shape[0]} classes" if w is not None else "no classifier"
        if not allow_new_classifier:
            raise UserError(f"{source} has {had}, the model here {args['num_classes']}: evaluate it on data "
                            f"with its classes")
        say(f"classifier '{cls}' re-initialised for {args['num_classes']} classes ({source} has {had})")
    if [k for k in unexpected if in_cls(k)]:
        say(f"the classifier '{cls}' of {source} is left out: the model here gives features")
    model.load_state_dict({k: v for k, v in sd.items() if k in own and k not in new_cls}, strict=False)


def load_weights(model: nn.Module, args: dict, path: str | Path, checkpoint_key: str = "teacher",
                 allow_new_classifier: bool = True) -> dict | None:
    """Load the weights file ``path`` into ``model`` (built from ``args``, see models.create).
    Returns the DINO head's state dict (visionzoo's names) when the file is a DINO training
    checkpoint, else None."""
    obj, meta = read_file(path)
    head = None
    if meta is not None:
        sd, what = obj, "visionzoo checkpoint"
    elif is_dino_training(obj):
        sd, head = from_dino_training(obj, checkpoint_key, path)
        what = f"DINO training checkpoint, {checkpoint_key}"
    elif is_mmcls(obj):
        sd, what = from_mmcls(obj, classifier_name(model, args)), "mmcls checkpoint"
    else:
        sd, what = from_state_dict(obj, path), "state dict"
    if meta is None and args["library"] == "timm":
        sd = from_timm(sd, model)
    elif meta is None and args["library"] == "torchvision":
        sd = from_torchvision(sd)
    load_into(model, sd, args, f"{path} ({what})", allow_new_classifier)
    say(f"weights from {path} ({what}) loaded into {args['library']} {args['name']}")
    return head or None


def file_num_classes(path: str | Path, model: nn.Module, args: dict, checkpoint_key: str = "teacher") -> int | None:
    """The class count of the classifier in a weights file (None: it has none), for ``args``'s model."""
    obj, meta = read_file(path)
    cls = classifier_name(model, args)
    if meta is not None:
        sd = obj
    elif is_dino_training(obj):
        sd = from_dino_training(obj, checkpoint_key, path)[0]
    elif is_mmcls(obj):
        sd = from_mmcls(obj, cls)
    else:
        sd = from_state_dict(obj, path)
    w = sd.get(f"{cls}.weight") if cls else None
    return int(w.shape[0]) if w is not None and w.ndim >= 1 else None


def model_from_weights(model_cfg: ModelConfig, path: str | Path, num_classes: int, in_chans: int,
                       allow_new_classifier: bool = False) -> tuple[nn.Module, dict]:
    """The network of a config's model section with the weights of ``path`` (``--weights``), and
    its constructor arguments (num_classes 0: a feature extractor)."""
    from visionzoo.models import create, model_args

    args = model_args(model_cfg, num_classes, in_chans)
    model = create(args)
    load_weights(model, args, path, model_cfg.checkpoint_key, allow_new_classifier)
    return model, args
