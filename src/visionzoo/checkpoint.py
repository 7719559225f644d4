"""Checkpoints: weights as safetensors (with the config and the model's constructor arguments
in the metadata, so eval/export/infer rebuild the model without the recipe) and the full
training state as a separate torch file, loaded with ``weights_only=True``.

Every file is written to a temporary name in the same folder, fsynced, then renamed, so a
crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from visionzoo.errors import UserError

WEIGHTS = "model.safetensors"
BEST = "best.safetensors"
STATE = "state.pt"
META_KEY = "visionzoo"


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync, and rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_weights(path: Path, model: torch.nn.Module, meta: dict) -> None:
    """Write ``model``'s state dict with ``meta`` (JSON) in the safetensors header."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)}))


def save_state(path: Path, state: dict) -> None:
    """Write the training state (optimizer, scaler, counters, RNG) for resuming."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def resolve_weights(path: str | Path) -> Path:
    """A checkpoint argument: a ``.safetensors`` file, or a run folder (its model.safetensors)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / WEIGHTS
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    return p


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and the metadata of a visionzoo safetensors checkpoint."""
    p = resolve_weights(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if META_KEY not in meta:
                raise UserError(f"{p} is a safetensors file but not a visionzoo checkpoint (no '{META_KEY}' metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"cannot read checkpoint {p}: {str(err).splitlines()[0]}") from None
    return tensors, json.loads(meta[META_KEY])


def load_state(path: str | Path) -> dict:
    """The training state saved by save_state (no arbitrary pickle code is run)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise UserError(f"cannot read training state {path}: {str(err).splitlines()[0]}") from None


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the network of a checkpoint from its metadata and load its weights."""
    from visionzoo.models import create

    tensors, meta = load_weights(path)
    model = create(meta["model"])
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not fit model {meta['model']['name']}: "
                        f"{len(missing)} missing and {len(unexpected)} unexpected tensors")
    return model, meta
