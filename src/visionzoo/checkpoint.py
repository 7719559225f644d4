"""Checkpoints: weights as safetensors (with the config and the model's constructor arguments
in the metadata, so eval/export/infer rebuild the model without the recipe) and the full
training state as a separate torch file, loaded with ``weights_only=True``.

Every file is written to a temporary name in the same folder, fsynced, then renamed, so a
crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from visionzoo.distributed import raise_agreed
from visionzoo.errors import UserError
from visionzoo.files import atomic_write, sha256_file  # noqa: F401  (also imported from here)

WEIGHTS = "model.safetensors"
BEST = "best.safetensors"
STATE = "state.pt"
META_KEY = "visionzoo"


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
    if p.is_dir() and not (p / WEIGHTS).is_file():
        if (p / "config.yaml").is_file():  # a run that has not written its first checkpoint
            raise UserError(f"{p} has no {WEIGHTS} yet: the run writes it with its first checkpoint")
        raise UserError(f"{p} is not a run folder: a run folder (written by visionzoo train) holds config.yaml, "
                        f"metrics.jsonl and {WEIGHTS}; give one, a .safetensors checkpoint, or --weights FILE "
                        f"--recipe NAME")
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


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a visionzoo checkpoint (a run folder or .safetensors file), without its tensors."""
    p = resolve_weights(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"cannot read checkpoint {p}: {str(err).splitlines()[0]}") from None
    if META_KEY not in meta:
        raise UserError(f"{p} is a safetensors file but not a visionzoo checkpoint (no '{META_KEY}' metadata)")
    return json.loads(meta[META_KEY])


def command_config(checkpoint: str | None, overrides: list[str], weights: str | None = None,
                   recipe: str | None = None) -> tuple[Any, dict[str, Any] | None]:
    """The config a command that reads weights (eval, knn, linear, export) runs with, plus
    ``overrides``, and the checkpoint's metadata (None with --recipe). Without ``weights`` the
    checkpoint gives model, weights and config; with ``weights`` the model and config come from
    ``recipe`` or, when there is none, from the run folder / checkpoint."""
    from visionzoo.config import from_dict, load_config

    if recipe and not weights:
        raise UserError("--recipe names the model for --weights; a run folder or checkpoint brings its own")
    if weights and recipe and checkpoint:
        raise UserError(f"give either a run folder ({checkpoint}) or --recipe {recipe} to take the model for "
                        f"--weights from")
    if weights and recipe:
        return load_config(recipe, overrides), None
    if not checkpoint:
        raise UserError("give a run folder or checkpoint, or --weights FILE with --recipe NAME")
    meta = read_metadata(checkpoint)
    return from_dict(meta["config"], overrides), meta


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


CHECKPOINTS = "checkpoints"
NO_EMA = "model_no_ema.safetensors"  # with train.ema_decay: the trained weights; model.safetensors is the EMA


def publish(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` (a hard link: no second copy of the bytes), atomically."""
    tmp = dst.with_name(f".{dst.name}.link")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save_checkpoint(run_dir: Path, step: int, net: torch.nn.Module, meta: dict, state: dict, keep: int,
                    ema_net: torch.nn.Module | None = None) -> Path:
    """Write the pair ``checkpoints/step-N.safetensors`` + ``step-N.pt`` (each atomically),
    point ``model.safetensors`` at the new weights, and delete all but the newest ``keep`` pairs.

    With ``ema_net`` (train.ema_decay) the run is evaluated on the EMA weights, so
    ``model.safetensors`` is the EMA (what results.json measured, and what eval, export, infer
    and the report load) and ``model_no_ema.safetensors`` the trained weights without it; the
    pair keeps both (``step-N.safetensors``: trained, ``step-N.ema.safetensors``) for resuming.

    A full disk or an unwritable folder is a UserError; older checkpoints are left intact."""
    folder = Path(run_dir) / CHECKPOINTS
    name = f"step-{step:09d}"
    try:
        folder.mkdir(exist_ok=True)
        ema = ema_net is not None
        save_weights(folder / f"{name}.safetensors", net, {**meta, "weights": "trained"} if ema else meta)
        if ema:
            save_weights(folder / f"{name}.ema.safetensors", ema_net, {**meta, "weights": "ema"})
        save_state(folder / f"{name}.pt", state)  # written last: a pair is complete once it exists
        publish(folder / f"{name}.safetensors", Path(run_dir) / (NO_EMA if ema else WEIGHTS))
        if ema:  # the measured model is the run's model
            publish(folder / f"{name}.ema.safetensors", Path(run_dir) / WEIGHTS)
    except OSError as err:
        older = [p.name for p, _ in checkpoint_pairs(run_dir) if not p.name.startswith(name)]
        kept = f"the previous checkpoint {older[0]} is intact" if older else "no earlier checkpoint exists"
        raise UserError(f"cannot write checkpoint {name} in {folder}: {err.strerror or err}; {kept}") from None
    for weights, state_path in checkpoint_pairs(run_dir)[keep:]:
        for p in (weights, state_path, weights.with_name(weights.name.replace(".safetensors", ".ema.safetensors"))):
            p.unlink(missing_ok=True)
    return folder / f"{name}.safetensors"


def checkpoint_pairs(run_dir: Path) -> list[tuple[Path, Path]]:
    """Complete (weights, state) pairs of a run, newest first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    pairs = []
    for state_path in folder.glob("step-*.pt"):
        weights = state_path.with_suffix(".safetensors")
        if weights.is_file():
            pairs.append((weights, state_path))
    return sorted(pairs, key=lambda p: p[1].name, reverse=True)


def load_latest(run_dir: Path) -> tuple[dict, dict, Path]:
    """The newest checkpoint of a run that loads: (state dict of the weights, training state,
    weights path), the same one on every rank.

    Rank 0 chooses and the choice is broadcast, so ranks never resume from different steps.
    A newer pair that is corrupt (truncated by a crash mid-write, not a checkpoint) is skipped
    with a warning naming it and why; an I/O error that is not corruption (permissions, a
    failing disk, a missing mount) stops the run with one line instead of going back silently.
    Temporary files of a write that was killed (``checkpoints/.step-*``) are removed first."""
    import torch.distributed as dist

    several = dist.is_initialized() and dist.get_world_size() > 1
    main = not several or dist.get_rank() == 0
    choice: list = [None]  # ("ok", weights file name) or ("error", message), from rank 0
    loaded = None
    if main:
        try:
            remove_partial_writes(run_dir)  # a read-only folder fails here: said to every rank below
            loaded, skipped = _choose(run_dir)
            choice = [("ok", loaded[2].name)]
            for name, why in skipped:
                print(f"warning: checkpoint {name} is unusable ({why}); resuming from {loaded[2].stem} instead, "
                      f"and the metrics logged after it are dropped", flush=True)
        except UserError as err:
            choice = [("error", str(err))]
        except OSError as err:
            choice = [("error", f"cannot resume from {Path(run_dir) / CHECKPOINTS}: {err.strerror or err}"
                                + (f" ({err.filename})" if err.filename else ""))]
    if several:
        dist.broadcast_object_list(choice, src=0)
    kind, value = choice[0]
    if kind == "error":
        raise_agreed(value)
    if main:
        return loaded
    weights = Path(run_dir) / CHECKPOINTS / value
    try:
        return _load_pair(weights, weights.with_suffix(".pt"))
    except Exception as err:  # noqa: BLE001 - see _choose
        raise UserError(f"rank {dist.get_rank()} cannot read checkpoint {weights} that rank 0 resumes from: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def remove_partial_writes(run_dir: Path) -> list[Path]:
    """Delete the temporary files that writes killed mid-way (SIGKILL, a node failure) left in
    the run's checkpoint folder (``.step-*``); returns them."""
    folder = Path(run_dir) / CHECKPOINTS
    stale = sorted(folder.glob(".step-*")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _load_pair(weights: Path, state_path: Path) -> tuple[dict, dict, Path]:
    """Read one (weights, state) pair and its EMA weights; raises what the libraries raise."""
    with safe_open(str(weights), framework="pt") as f:
        if META_KEY not in (f.metadata() or {}):
            raise ValueError("not a visionzoo checkpoint")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    ema = weights.with_name(weights.name.replace(".safetensors", ".ema.safetensors"))
    if ema.is_file():
        with safe_open(str(ema), framework="pt") as f:
            state["ema_weights"] = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, state, weights


def _choose(run_dir: Path) -> tuple[tuple[dict, dict, Path], list[tuple[str, str]]]:
    """The newest pair that loads, and the newer ones skipped as corrupt (name, why)."""
    skipped = []
    for weights, state_path in checkpoint_pairs(run_dir):
        try:
            return _load_pair(weights, state_path), skipped
        except OSError as err:
            if err.errno is not None:  # the file system failed, not the file's bytes: say so, do not go back
                raise UserError(f"cannot read checkpoint {weights.stem} in {weights.parent}: {err.strerror or err} "
                                f"({err.filename or state_path}); fix this and resume again (an older "
                                "checkpoint is not used in its place)") from None
            skipped.append((weights.stem, str(err).splitlines()[0] if str(err) else type(err).__name__))
        except Exception as err:  # noqa: BLE001 - safetensors, zip and pickle readers raise many types
            skipped.append((weights.stem, str(err).splitlines()[0] if str(err) else type(err).__name__))
    detail = f" ({'; '.join(f'{n}: {w}' for n, w in skipped)})" if skipped else ""
    raise UserError(f"no usable checkpoint in {Path(run_dir) / CHECKPOINTS}{detail}")
