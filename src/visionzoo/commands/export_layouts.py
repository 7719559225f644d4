"""``visionzoo export --format hf|torchvision|dino|mmcls``: a checkpoint's weights in the layout
another library loads (the writers: models/weights_out.py, the model card: models/model_card.py),
each file read back before it is kept: by visionzoo's readers of that layout (models/weights.py,
``visionzoo.load``) and by timm / torchvision themselves where they load it, with the model's
outputs on a random batch; a ``FILE.sha256`` (sha256sum's format) beside each weights file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from visionzoo.checkpoint import load_model, sha256_file
from visionzoo.errors import UserError, first_line
from visionzoo.files import write_text
from visionzoo.models import weights_out as wo

ALWAYS = ("onnx", "torchscript", "pt2")  # the graph formats (commands/export.py) hold any model
READ_BACK_BATCH = 3  # random images each reader's outputs are compared on


class Source(NamedTuple):
    """What is exported: the model, its checkpoint-style metadata (config, model args, classes,
    task, epoch, acc1), the weights file and whether it came with --weights (not trained here)."""

    model: nn.Module
    meta: dict
    path: Path
    from_weights: bool


def check_layout_flags(fmt: str, full_checkpoint: bool, from_weights: bool, onnx_flags: dict) -> None:
    """--full-checkpoint goes with --format dino and a run folder; the ONNX flags (those of
    ``onnx_flags`` given) with no library layout."""
    if full_checkpoint and fmt != "dino":
        raise UserError(f"--full-checkpoint is for --format dino (this export is {fmt})")
    if full_checkpoint and from_weights:
        raise UserError("--full-checkpoint writes a DINO run's training state: give the run folder, not --weights")
    given = [flag for flag, value in onnx_flags.items() if value not in (None, False)]
    if given and fmt in wo.LAYOUTS:
        raise UserError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for ONNX exports, not --format {fmt}")


def _layout_path(output: str | None, default: Path, src: Path) -> Path:
    """``--output`` as a file (it has a suffix) or a folder (``default``'s name inside), else
    ``default``; never the weights being exported."""
    out = default if output is None else Path(output).expanduser()
    if output is not None and (out.is_dir() or not out.suffix):
        out = out / default.name
    if out.exists() and out.resolve() == src.resolve():
        raise UserError(f"the export would replace its own source {src}: give --output")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _run_results(src: Path, recipe: str) -> dict | None:
    """The run's results.json when ``src`` is that run's final model.safetensors (best.safetensors
    and older checkpoints carry their own Acc@1 in their metadata instead)."""
    from visionzoo.checkpoint import WEIGHTS

    path = src.parent / "results.json"
    if src.name != WEIGHTS or not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results.get("recipe") == recipe else None


def _dino_state(src: Path, model: nn.Module) -> dict:
    """The DINO training state whose teacher backbone is ``model``: beside a step-N.safetensors,
    or the run folder's newest checkpoint pair."""
    from visionzoo.checkpoint import checkpoint_pairs, load_state

    mine = model.state_dict()
    for path in [src.with_suffix(".pt"), *(state for _, state in checkpoint_pairs(src.parent))]:
        if path.is_file():
            state = load_state(path)
            # the task's entries (student, teacher, optimizer, ...) beside the run's (epoch, steps)
            state = {**{k: v for k, v in state.items() if k != "task"}, **state.get("task", {})}
            teacher = state.get("teacher", {})
            if all(torch.equal(teacher.get(f"backbone.{k}", torch.empty(0)), v.cpu()) for k, v in mine.items()):
                return state
    raise UserError(f"--full-checkpoint needs the DINO training state that holds {src} (a run folder's "
                    f"checkpoints/step-*.pt); none was found")


Reads = list[tuple[str, Callable[[], nn.Module]]]  # (who reads the file back, a function building its model)


def _reader(source: Source, path: Path, key: str = "teacher") -> Callable[[], nn.Module]:
    """visionzoo's --weights reader (models/weights.py) of ``path``, into the source's model."""
    from visionzoo.config import from_dict
    from visionzoo.models.weights import model_from_weights

    model_cfg = replace(from_dict(source.meta["config"]).model, checkpoint_key=key)
    args = source.meta["model"]
    return lambda: model_from_weights(model_cfg, path, args["num_classes"], args["in_chans"])[0]


def _write_torchvision(source: Source, output: str | None) -> tuple[list[Path], Reads]:
    data = wo.torch_bytes(wo.torchvision_layout(source.model))
    args = source.meta["model"]
    path = _layout_path(output, source.path.parent / f"{args['name']}-{_sha256(data)[:8]}.pth", source.path)
    wo.write_bytes(path, data)
    return [path], [("torchvision strict=True", lambda: _torchvision_strict(path, args)),
                    ("visionzoo --weights", _reader(source, path))]


def _write_mmcls(source: Source, output: str | None) -> tuple[list[Path], Reads]:
    from visionzoo.version import __version__

    meta, args = source.meta, source.meta["model"]
    recipe = meta["config"]["recipe"]
    extra = {"epoch": int(meta["epoch"])} if meta.get("epoch") is not None else {}
    extra["visionzoo"] = {"version": __version__, "recipe": recipe, "model": f"{args['library']} {args['name']}"}
    data = wo.torch_bytes(wo.mmcls_layout(source.model, list(meta["classes"]), extra))
    path = _layout_path(output, source.path.parent / f"{recipe}_mmcls-{_sha256(data)[:8]}.pth", source.path)
    wo.write_bytes(path, data)
    return [path], [("visionzoo --weights (mmcls)", _reader(source, path))]


def _write_dino(source: Source, output: str | None, full_checkpoint: bool) -> tuple[list[Path], Reads]:
    from visionzoo.config import from_dict, to_yaml

    cfg, model = from_dict(source.meta["config"]), source.model
    state = _dino_state(source.path, model) if full_checkpoint else None  # before anything is written
    path = _layout_path(output, source.path.parent / f"{cfg.recipe}_pretrain.pth", source.path)
    wo.write_bytes(path, wo.torch_bytes(wo.dino_backbone_layout(model)))
    files, reads = [path], [("visionzoo --weights (DINO backbone)", _reader(source, path))]
    if state is not None:
        dino_args = {"arch": source.meta["model"]["name"], "patch_size": int(model.patch_embed.patch_size[0]),
                     "out_dim": cfg.dino.out_dim, "use_bn_in_head": cfg.dino.use_bn_in_head,
                     "norm_last_layer": cfg.dino.norm_last_layer, "visionzoo_recipe": to_yaml(cfg)}
        full = path.with_name(path.stem + "_full_checkpoint.pth")
        wo.write_bytes(full, wo.torch_bytes(wo.dino_training_layout(state, dino_args)))
        files.append(full)
        try:
            _check_dino_networks(full, state)
        except UserError:
            for f in files:
                f.unlink(missing_ok=True)
            raise
        reads.append(("visionzoo --weights --checkpoint-key teacher", _reader(source, full, "teacher")))
    return files, reads


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _torchvision_strict(path: Path, args: dict) -> nn.Module:
    """torchvision's own model of ``args`` with the file loaded strictly (what its users do)."""
    import torchvision

    net = torchvision.models.get_model(args["name"], weights=None, num_classes=args["num_classes"],
                                       **dict(args.get("kwargs") or {}))
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return net


def _check_dino_networks(path: Path, state: dict) -> None:
    """Both networks of a written DINO training checkpoint, read by visionzoo's reader of that
    layout (models/weights.py), equal the training state's tensors: backbones and heads."""
    from visionzoo.models.weights import from_dino_training, read_file

    obj = read_file(path)[0]
    for key in ("teacher", "student"):
        backbone, head = from_dino_training(obj, key, path)
        got = {**{f"backbone.{k}": v for k, v in backbone.items()}, **{f"head.{k}": v for k, v in head.items()}}
        want = state[key]
        if sorted(got) != sorted(want) or not all(torch.equal(got[k], want[k].cpu()) for k in want):
            raise UserError(f"{path}: the {key} read back differs from the training state; nothing kept")


def _write_hf(source: Source, size: int, output: str | None) -> tuple[list[Path], Reads]:
    """The Hugging Face / timm folder with its model card (results.json's numbers when the source
    is the run's final weights); read back by visionzoo.load and, for timm models, by timm."""
    from visionzoo.config import from_dict, to_yaml
    from visionzoo.models.model_card import model_card

    model, meta, src, from_weights = source
    cfg, args = from_dict(meta["config"]), meta["model"]
    folder = Path(output).expanduser() if output else src.parent / f"{src.name.split('.')[0]}_hf"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--format hf writes a folder; {folder} is a file")
    if (folder / wo.HF_WEIGHTS).resolve() == src.resolve():
        raise UserError(f"the export would replace its own source {src}: give --output")
    results = None if from_weights else _run_results(src, cfg.recipe)
    origin = {"path": str(src.resolve()), "sha256": sha256_file(src), "weights_of": from_weights}
    config = wo.hf_config(model, args, list(meta["classes"]), cfg.data, size)
    files = wo.write_hf(folder, model, meta, config, to_yaml(replace(cfg, output=None)),
                        lambda shas: model_card(cfg, meta, results, origin, shas))
    reads = [("visionzoo.load", lambda: load_model(folder)[0])]
    if args["library"] == "timm":
        reads.append(('timm.create_model("local-dir:...")', lambda: _timm_local_dir(folder)))
    return files, reads


def _timm_local_dir(folder: Path) -> nn.Module:
    import timm

    return timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True)


def _write_layout(fmt: str, source: Source, size: int, output: str | None,
                  full_checkpoint: bool) -> tuple[list[Path], Reads]:
    """Write the source's model in layout ``fmt``; the files, and the readers that load them back."""
    if fmt == "hf":
        return _write_hf(source, size, output)
    if fmt == "torchvision":
        return _write_torchvision(source, output)
    if fmt == "mmcls":
        return _write_mmcls(source, output)
    return _write_dino(source, output, full_checkpoint)


def export_weights(source: Source, fmt: str, size: int, output: str | None, tolerance: float,
                   full_checkpoint: bool = False) -> dict:
    """``visionzoo export --format hf|torchvision|dino|mmcls``: ``source`` in that library's layout,
    each file read back (visionzoo's readers, and timm / torchvision themselves where they load
    it) with the model's outputs on a random batch of ``size`` px images, within ``tolerance`` x
    max(1, max |output|) (as export's parity check), and a ``FILE.sha256`` beside it; returns what
    was written and checked. A layout that cannot hold the model is one UserError line naming the
    formats that can. ``full_checkpoint``: DINO's training checkpoint too."""
    model, meta, src, from_weights = source
    check_layout_flags(fmt, full_checkpoint, from_weights, {})
    args, task = meta["model"], meta.get("task", meta["config"].get("task", "supervised"))
    why = wo.unfit(fmt, model, args, task)
    if why:
        can = ", ".join(wo.fitting(model, args, task, ALWAYS))
        raise UserError(f"--format {fmt} cannot hold {args['library']} {args['name']} ({why}); "
                        f"it exports as {can}")
    model = model.float().eval()
    check = torch.randn(READ_BACK_BATCH, args["in_chans"], size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(check).float()
    files, reads = _write_layout(fmt, source._replace(model=model), size, output, full_checkpoint)
    parity = []
    try:
        for label, read in reads:
            parity.append(_read_back(label, read, check, reference, tolerance))
    except BaseException:
        for f in files:  # nothing half-checked is left behind
            f.unlink(missing_ok=True)
        raise
    record = {"format": fmt, "files": [], "parity": parity,
              "source": {"path": str(src.resolve()), "sha256": sha256_file(src)}}
    for f in files:
        if f.suffix in (".pth", ".safetensors"):
            sha = sha256_file(f)
            write_text(Path(f"{f}.sha256"), f"{sha}  {f.name}\n")  # sha256sum's format: sha256sum -c reads it
            record["files"].append({"file": str(f), "sha256": sha})
    main_file = files[0].parent if fmt == "hf" else files[0]
    worst = max(p["max_abs_diff"] for p in parity)
    print(f"{main_file}: {fmt} export of {args['library']} {args['name']} ({wo.LAYOUTS[fmt]}); read back by "
          f"{', '.join(p['reader'] for p in parity)}: max abs diff {worst:.2e}; sha256 in "
          f"{', '.join(Path(r['file']).name + '.sha256' for r in record['files'])}", flush=True)
    return record


def _read_back(label: str, read: Callable[[], nn.Module], x: torch.Tensor, reference: torch.Tensor,
               tolerance: float) -> dict:
    """The outputs of the model ``read`` builds from the written file, against ``reference``."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # the readers' "loaded" lines
        try:
            net = read().float().eval()
        except (RuntimeError, KeyError, ValueError) as err:
            raise UserError(f"{label} cannot read the export back: {first_line(err)}; nothing kept") from None
    with torch.no_grad():
        got = net(x).float()
    diff = float((got - reference).abs().max()) if got.shape == reference.shape else float("inf")
    limit = tolerance * max(1.0, float(reference.abs().max()))
    if not diff <= limit:
        raise UserError(f"{label} does not give the model's outputs back: max abs difference {diff:.3g} on a random "
                        f"batch of {len(x)} (limit {limit:.3g}); nothing kept")
    return {"reader": label, "max_abs_diff": diff, "limit": limit}
