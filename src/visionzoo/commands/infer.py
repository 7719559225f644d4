"""``visionzoo infer``: run an exported ONNX model with ONNX Runtime, without PyTorch models.

Over a validation split it reports top-1/top-5, images/s and mean latency per image (the
figures of the seeds' ``acc.log``) and writes them as JSON; over image files it prints the
top-5 classes of each. Everything it needs (preprocessing, classes, the recipe's data section)
comes from the sidecar that ``visionzoo export`` wrote next to the model, so the split is read
and preprocessed exactly as ``visionzoo eval`` reads it."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from visionzoo.checkpoint import atomic_write
from visionzoo.commands.export import sha256_file, sidecar_path
from visionzoo.errors import UserError, first_line
from visionzoo.progress import Progress

if TYPE_CHECKING:
    from visionzoo.config import DataConfig

TOPK = 5
MAX_DEFAULT_BATCH = 256  # recipes' global batches (1024) are sized for 8 GPUs, not one CPU process
SIDECAR_KEYS = ("format", "input", "output", "classes", "data", "preprocess")


def providers() -> list[str]:
    """ONNX Runtime providers to use, best first: CUDA where this onnxruntime has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def is_onnx_model(path: Path) -> bool:
    """Whether ``path`` parses as an ONNX model with a graph (by the onnx package; without it,
    by its .onnx suffix)."""
    try:
        import onnx
    except ImportError:
        return path.suffix == ".onnx"
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and OSErrors: not a model we can read
        return False
    return model.ir_version > 0 and len(model.graph.node) > 0


def read_sidecar(model_path: Path) -> dict:
    """The sidecar of an exported model, checked for the keys inference needs."""
    side = sidecar_path(model_path)
    if not side.is_file():
        if not is_onnx_model(model_path):  # a missing sidecar is not the problem then
            raise UserError(f"{model_path} is not an ONNX model: visionzoo infer runs the model.onnx that "
                            f"visionzoo export writes (with its model.json sidecar beside it)")
        raise UserError(f"no sidecar {side.name} next to {model_path} (it holds the preprocessing and "
                        f"class names): export the checkpoint again with visionzoo export")
    try:
        meta = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read sidecar {side}: {first_line(err)}") from None
    missing = [k for k in SIDECAR_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UserError(f"{side} is not a visionzoo export sidecar (missing {', '.join(missing)})")
    if meta["format"] != "onnx":
        raise UserError(f"{side} describes a {meta['format']} export; visionzoo infer runs ONNX models")
    return meta


def load_exported(model_path: str | Path) -> tuple[Any, dict]:
    """An ONNX Runtime session for ``model_path`` and its sidecar, after checking that the
    two agree on the input shape and the number of classes."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("visionzoo infer needs onnxruntime: pip install 'visionzoo[export]'") from None
    path = Path(model_path).expanduser()
    if not path.is_file():
        raise UserError(f"model not found: {path}")
    meta = read_sidecar(path)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ONNX Runtime's optimizer warnings are noise here
    for key, value in (meta.get("session_options") or {}).items():  # a bf16 export's kernel choice
        options.add_session_config_entry(key, value)
    try:
        session = ort.InferenceSession(str(path), options, providers=providers())
    except Exception as err:  # onnxruntime's pybind errors share no useful base class
        raise UserError(f"{path} is not an ONNX model ONNX Runtime can load: {first_line(err)}") from None
    if meta.get("output", {}).get("kind") == "features":
        raise UserError(f"{path.name} is a DINO backbone (it outputs features, not class scores): evaluate "
                        f"it with visionzoo knn or visionzoo linear on its run folder")
    inputs, outputs = session.get_inputs(), session.get_outputs()
    want_in, n_classes = list(meta["input"]["shape"]), len(meta["classes"])
    got_in = list(inputs[0].shape) if len(inputs) == 1 else None
    # Symbolic dimensions (the batch axis, or spatial axes of a re-exported model) match anything;
    # the lengths are equal by then.
    if got_in is None or len(got_in) != len(want_in) or any(
            isinstance(g, int) and g != w for g, w in zip(got_in[1:], want_in[1:], strict=True)):
        raise UserError(f"{sidecar_path(path).name} does not match {path.name}: the sidecar says input "
                        f"{want_in}, the model takes {[i.shape for i in inputs]}")
    got_out = outputs[0].shape[-1] if outputs and outputs[0].shape else None
    if not isinstance(got_out, int) or got_out != n_classes:
        raise UserError(f"{sidecar_path(path).name} does not match {path.name}: the sidecar names "
                        f"{n_classes} classes, the model outputs {got_out}")
    if meta.get("sha256") and sha256_file(path) != meta["sha256"]:
        # A converted or optimised copy of the model is fine as long as the shapes agree.
        print(f"visionzoo: warning: {path.name} is not the file {sidecar_path(path).name} was written for "
              f"(sha256 differs); its input and output shapes match, so going on", file=sys.stderr)
    if meta.get("quantization"):
        from visionzoo.commands.quantize import target_warning

        warning = target_warning(meta["quantization"])
        if warning:
            print(f"visionzoo: warning: {path.name}: {warning}", file=sys.stderr, flush=True)
    return session, meta


def _data_config(meta: dict, overrides: list[str]) -> DataConfig:
    from visionzoo.config import from_dict

    return from_dict({"recipe": meta.get("recipe") or "export", "data": meta["data"]}, overrides).data


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def infer_split(model: str, data: str | None = None, batch_size: int | None = None,
                workers: int | None = None, output: str | None = None, strict: bool = False) -> dict:
    """Accuracy and speed of an ONNX model over the validation split of its recipe's data set
    (``data`` overrides the folder, as ``eval --data`` does); prints them and writes JSON.
    Unreadable images are skipped and counted; ``strict``: the first one stops it."""
    session, meta = load_exported(model)
    d, loader, batch = _split_loader(meta, data, batch_size, workers)
    name, shape = session.get_inputs()[0].name, tuple(meta["input"]["shape"][1:])
    session.run(None, {name: np.zeros((1, *shape), np.float32)})  # the first run allocates memory arenas
    # A low-precision export (int8, bf16) is measured next to its fp32 model, on the same batches.
    from visionzoo.commands.quantize import reference_session

    reference = reference_session(Path(model).expanduser(), meta)
    tally = _run_split(loader, session, reference, shape, strict)
    if tally.count == 0:
        raise UserError("no readable images in the validation split")
    result = _split_result(model, d, meta, session, tally, batch)
    out = Path(output) if output else Path(model).with_name(Path(model).stem + ".infer.json")
    _write_json(out, result)
    _print_split(model, meta, result, out)
    return result


def _split_loader(meta: dict, data: str | None, batch_size: int | None,
                  workers: int | None) -> tuple[DataConfig, Any, int]:
    """The data section of the sidecar (with ``data`` and ``workers`` overridden), the loader eval
    uses over its validation split (on the CPU: ONNX Runtime takes numpy) and its batch size."""
    from visionzoo.data.loading.build import build_datasets, build_loaders
    from visionzoo.data.sources.table import data_override, data_source

    overrides = [data_override(data)] if data else []
    if workers is not None:
        overrides.append(f"data.workers={workers}")
    d = _data_config(meta, overrides)
    batch = batch_size if batch_size is not None else min(d.batch_size, MAX_DEFAULT_BATCH)
    if batch < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch}")
    splits = build_datasets(d, train=False)
    if not data_source(d.name).generated and splits.classes != meta["classes"]:
        raise UserError(f"the data's {len(splits.classes)} classes are not the {len(meta['classes'])} "
                        f"classes the model was trained on")
    # The loader eval uses (same reader, same preprocessing).
    _, loader = build_loaders(splits, d, batch, torch.device("cpu"))
    return d, loader, batch


@dataclass
class _Tally:
    """Counts and times of one pass over a split; ``ref_*``: the fp32 reference model's."""

    correct1: int = 0
    correct5: int = 0
    count: int = 0
    bad: int = 0
    run_s: float = 0.0  # in ONNX Runtime, this model
    wall_s: float = 0.0  # end to end, the reference's time left out
    with_reference: bool = False
    ref_correct1: int = 0
    ref_s: float = 0.0


def _run_split(loader: Any, session: Any, reference: Any, shape: tuple, strict: bool) -> _Tally:
    """Run ``session`` (and ``reference``, when there is one) over the batches of ``loader``."""
    from visionzoo.engine.evaluation.topk import topk_correct

    name = session.get_inputs()[0].name
    tally = _Tally(with_reference=reference is not None)
    t0 = time.perf_counter()
    for images, targets, n_bad in Progress(loader, len(loader), "infer", leave=False):
        tally.bad += _counted(n_bad, strict)
        if images.numel() == 0:
            continue
        x = np.ascontiguousarray(images.numpy(), dtype=np.float32)
        if x.shape[1:] != shape:
            raise UserError(f"the data's images are preprocessed to {list(x.shape[1:])} but the model "
                            f"takes {list(shape)}")
        t = time.perf_counter()
        logits = session.run(None, {name: x})[0]
        tally.run_s += time.perf_counter() - t
        c1, c5 = topk_correct(torch.from_numpy(logits), targets)
        if reference is not None:
            t = time.perf_counter()
            ref_logits = reference.run(None, {name: x})[0]
            tally.ref_s += time.perf_counter() - t  # left out of this model's images/s
            tally.ref_correct1 += int(topk_correct(torch.from_numpy(ref_logits), targets)[0])
        tally.correct1, tally.correct5 = tally.correct1 + int(c1), tally.correct5 + int(c5)
        tally.count += len(targets)
    tally.wall_s = time.perf_counter() - t0 - tally.ref_s
    return tally


def _split_result(model: str, d: DataConfig, meta: dict, session: Any, tally: _Tally, batch: int) -> dict:
    """The JSON record of ``visionzoo infer`` over a split."""
    import onnxruntime

    from visionzoo.data.sources.table import data_source

    count, wall = tally.count, tally.wall_s
    result = {
        "model": str(model), "data": d.name if data_source(d.name).generated else d.path, "dataset": d.name,
        "acc1": 100.0 * tally.correct1 / count, "acc5": 100.0 * tally.correct5 / count, "samples": count,
        "bad_images": tally.bad,
        "images_per_s": count / wall,  # end to end: reading, preprocessing and the model
        "ms_per_image": 1000.0 * tally.run_s / count,  # mean time in ONNX Runtime per image
        "wall_s": wall, "batch_size": batch, "provider": session.get_providers()[0],
        "onnxruntime": onnxruntime.__version__, "precision": meta.get("precision", "fp32"),
    }
    if tally.with_reference:
        result["fp32_acc1"] = 100.0 * tally.ref_correct1 / count
        result["fp32_ms_per_image"] = 1000.0 * tally.ref_s / count  # the same batches, for the speed-up
    return result


def _print_split(model: str, meta: dict, result: dict, out: Path) -> None:
    """The lines ``visionzoo infer`` ends with over a split (and the fp32 comparison of a low-precision model)."""
    k = min(5, len(meta["classes"]))  # top-5 is top-k with fewer classes: named for what it is
    bad = result["bad_images"]
    print(f"{model}: Acc@1 {result['acc1']:.2f}%  Acc@{k} {result['acc5']:.2f}%  ({result['samples']} images"
          + (f", {bad} unreadable skipped" if bad else "") + f") | {result['images_per_s']:.1f} images/s, "
          f"{result['ms_per_image']:.3f} ms per image in ONNX Runtime ({result['provider']}, "
          f"batch {result['batch_size']}), {result['wall_s']:.1f} s in all | results {out}")
    if "fp32_acc1" in result:
        print(f"{model}: {result['precision']} Acc@1 {result['acc1']:.2f}% | fp32 Acc@1 {result['fp32_acc1']:.2f}% "
              f"({meta['reference']['file']}, same images) | difference {result['acc1'] - result['fp32_acc1']:+.2f} pt"
              f" | {result['fp32_ms_per_image'] / result['ms_per_image']:.2f}x the fp32 model's speed in ONNX Runtime")


def _counted(n_bad: int, strict: bool) -> int:
    """A batch's unreadable images, counted; with --strict the first one ends the command."""
    if not (strict and n_bad):
        return n_bad
    names = getattr(n_bad, "names", ())  # data.sources.folder.Unreadable, where the reader knows them
    raise BadImage(f"cannot decode image {names[0]} (--strict)" if names else
                   f"{int(n_bad)} image(s) of the validation split cannot be decoded (--strict)")


def preprocess_image(path: str | Path, d: DataConfig, in_chans: int, size: int) -> tuple[np.ndarray, str]:
    """One image file as the model's [C, size, size] float32 input, preprocessed as
    ``visionzoo eval`` and ``visionzoo.predict`` do (data/augment/presets.py EvalInput). Returns the
    array and a note (non-empty when the image had to be resized to the model's size). A file
    that cannot be decoded is a BadImage."""
    from PIL import Image

    from visionzoo.data.augment.presets import EvalInput
    from visionzoo.data.sources.folder import DECODE_ERRORS

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"image not found: {p}")
    try:
        with Image.open(p) as img:
            img.load()  # decode now, so a truncated file fails here and not in the transform
            img = img.copy()
    except DECODE_ERRORS as err:
        raise BadImage(f"cannot decode image {p}: {first_line(err)}") from None
    preprocess = EvalInput(d, in_chans)
    x = preprocess(img)
    # The recipe evaluates images at their stored size (CIFAR, MNIST): another size is brought to
    # the model's by the usual short-side resize and centre crop.
    note = f"resized from {img.width}x{img.height}" if preprocess.resized(img) else ""
    if tuple(x.shape) != (in_chans, size, size):
        raise UserError(f"{p} preprocesses to {list(x.shape)}, the model takes {[in_chans, size, size]}")
    return x.numpy().astype(np.float32), note


class BadImage(UserError):
    """An image file that cannot be read: skipped by ``visionzoo infer`` (stops it with --strict)."""


def predict_images(model: str, images: list[str], output: str | None = None, topk: int = TOPK,
                   strict: bool = False) -> dict:
    """Top-``topk`` classes and probabilities of each image file; prints them and a summary line,
    returns them (and writes them as JSON to ``output`` when given). An unreadable file is named,
    skipped and counted, as training skips one; ``strict``: it stops the command instead."""
    session, meta = load_exported(model)
    missing = next((p for p in images if not Path(p).expanduser().is_file()), None)
    if missing is not None:  # a mistyped name: said before any work, not skipped
        raise UserError(f"image not found: {Path(missing).expanduser()}")
    d = _data_config(meta, [])
    _, chans, size, _ = meta["input"]["shape"]
    name, classes = session.get_inputs()[0].name, meta["classes"]
    results, skipped = [], []
    for path in images:
        try:
            x, note = preprocess_image(path, d, chans, size)
        except BadImage as err:
            if strict or len(images) == 1:  # one image: there is nothing else to do
                raise
            skipped.append({"image": str(path), "error": str(err)})
            print(f"visionzoo: skipped: {err}", file=sys.stderr, flush=True)
            continue
        t = time.perf_counter()
        logits = session.run(None, {name: x[None]})[0][0].astype(np.float64)
        ms = 1000.0 * (time.perf_counter() - t)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[:min(topk, len(classes))]
        preds = [{"class": classes[i], "index": int(i), "prob": float(probs[i])} for i in top]
        results.append({"image": str(path), "top": preds, "ms": ms, **({"note": note} if note else {})})
        print(f"{path}:" + (f" ({note})" if note else ""))
        for pr in preds:
            print(f"  {100 * pr['prob']:6.2f}%  {pr['class']}")
    if skipped and not results:
        raise UserError(f"none of the {len(skipped)} images can be decoded")
    out = {"model": str(model), "classified": len(results), "bad_images": len(skipped), "images": results,
           "skipped": skipped}
    print(_summary(model, len(results), [s["image"] for s in skipped], output))
    if output:
        _write_json(Path(output), out)
    return out


def _summary(model: str, classified: int, skipped: list[str], output: str | None) -> str:
    """The line that ends ``visionzoo infer`` on image files: counts, the skipped files, the JSON."""
    line = f"{model}: {classified} image(s) classified"
    if skipped:
        more = ", ..." if len(skipped) > 3 else ""
        line += f", {len(skipped)} unreadable skipped ({', '.join(skipped[:3])}{more})"
    return line + (f" | results {output}" if output else "")


def run_infer(model: str, images: list[str], data: str | None = None, batch_size: int | None = None,
              workers: int | None = None, output: str | None = None, strict: bool = False) -> Any:
    """``visionzoo infer``: a validation split (``data``) or image files, not both."""
    if images and data:
        raise UserError("give either --data PATH (a validation split) or image files, not both")
    if images:
        return predict_images(model, expand_images(images, model), output, strict=strict)
    if not data:  # the split the recipe trained on (data.path in the sidecar): say so
        meta = read_sidecar(Path(model).expanduser()) if Path(model).expanduser().is_file() else {}
        where = (meta.get("data") or {}).get("path") or "its default location"
        print(f"visionzoo: no images and no --data given: measuring accuracy on the validation split of the "
              f"data the model was trained on ({where}); pass image files or --data DIR for others", flush=True)
    return infer_split(model, data, batch_size, workers, output, strict)


def expand_images(paths: list[str], model: str) -> list[str]:
    """Image arguments with folders replaced by the image files under them (sorted); a folder
    without images is a UserError that points to --data (accuracy on a labelled split)."""
    from visionzoo.data.sources.folder import IMAGE_EXTENSIONS

    out = []
    for path in paths:
        p = Path(path).expanduser()
        if not p.is_dir():
            out.append(path)
            continue
        found = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        if not found:
            raise UserError(f"{p} is a folder with no images in it; for accuracy on a labelled split "
                            f"(class folders) use: visionzoo infer {model} --data {p}")
        print(f"visionzoo: {p} is a folder: classifying its {len(found)} images (for accuracy on it as a "
              f"labelled split use --data {p})", flush=True)
        out += found
    return out
