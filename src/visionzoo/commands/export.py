"""``visionzoo export``: a checkpoint as an ONNX model (or TorchScript / torch.export ``.pt2``)
plus a JSON sidecar holding everything inference needs, checked against PyTorch before it is
kept.

The sidecar of ``X.onnx`` is ``X.json`` (of other files: the file name plus ``.json``). It
stores the input shape, the eval preprocessing (resize, crop, interpolation, mean/std in 0-255
units, channels), the class names, the recipe with its resolved ``data`` section (so ``infer``
rebuilds the same validation split), the source checkpoint (path + sha256) and the parity
result. Export runs a random batch through PyTorch and through the exported file; a difference
beyond the tolerance is an error and no file is kept. ``--format hf|torchvision|dino|mmcls``
writes the weights in another library's layout instead: export_layouts.py."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from visionzoo.checkpoint import atomic_write, load_model, resolve_weights, sha256_file
from visionzoo.commands.export_layouts import Source, check_layout_flags, export_weights
from visionzoo.errors import UserError, first_line
from visionzoo.models.weights_out import LAYOUTS

if TYPE_CHECKING:
    from visionzoo.commands.quantize import Int8Target
    from visionzoo.config import DataConfig, RecipeConfig

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "pt2": ".pt2"}  # graphs; the layouts: LAYOUTS
DEFAULT_OPSET = 17  # ONNX Runtime >= 1.14 runs it; the TorchScript exporter's best-tested range
# The TorchScript exporter writes opsets 9 (its base) to 20 (its maximum).
ONNX_MIN_OPSET, ONNX_MAX_OPSET = 9, 20
# Parity passes when max |torch - exported| <= tolerance * max(1, max |torch logit|): relative
# for large logits (trained nets reach 10-30), absolute near zero (random-init nets).
DEFAULT_TOLERANCE = 1e-4
TRACE_BATCH, CHECK_BATCH = 2, 3  # checked at another batch size than traced: proves the dynamic axis
INPUT_NAME, OUTPUT_NAME, FEATURES_NAME = "images", "logits", "features"


def sidecar_path(model_path: str | Path) -> Path:
    """Where the JSON sidecar of an exported file lives."""
    p = Path(model_path)
    return p.with_suffix(".json") if p.suffix == ".onnx" else p.with_name(p.name + ".json")


def input_size(d: DataConfig) -> int:
    """Side of the square images the model sees at evaluation (data/augment/presets.py eval_size)."""
    from visionzoo.data.augment.presets import eval_size

    return eval_size(d)


def _output_path(weights: Path, fmt: str, output: str | None) -> Path:
    suffix = FORMATS[fmt]
    default_name = weights.name.removesuffix(weights.suffix) + suffix if weights.suffix in (
        ".safetensors", ".pth", ".pt", ".bin", ".ckpt") else weights.name + suffix
    if output is None:
        return weights.parent / default_name
    out = Path(output).expanduser()
    # A folder (existing, or named without a file suffix) gets the default file name inside.
    if out.is_dir() or not out.suffix:
        out.mkdir(parents=True, exist_ok=True)
        return out / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] averaging matrix of adaptive average pooling along one axis (PyTorch's bins:
    floor(i*n_in/n_out) .. ceil((i+1)*n_in/n_out))."""
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        a, b = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, a:b] = 1.0 / (b - a)
    return m


class _PoolAsMatmul(nn.Module):
    """AdaptiveAvgPool2d for one fixed input size as two matrix products. The TorchScript ONNX
    exporter refuses output sizes that do not divide the input (AlexNet's 6x6 pool on inputs
    under 224 px, where the features are 1x1 or 3x3); matrix products export everywhere."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]):
        super().__init__()
        self.register_buffer("ph", _pool_matrix(in_hw[0], out_hw[0]), persistent=False)
        self.register_buffer("pwt", _pool_matrix(in_hw[1], out_hw[1]).T.contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ph @ x @ self.pwt  # [Oh, Ih] @ [B, C, Ih, Iw] @ [Iw, Ow]


def _replace_uneven_pools(model: nn.Module, example: torch.Tensor) -> int:
    """Swap (in place) the AdaptiveAvgPool2d layers whose output does not divide their input at
    this input size for _PoolAsMatmul; returns how many. The parity check, against outputs
    computed before the swap, covers it."""
    shapes: dict[str, tuple] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, (i[0].shape[-2:], o.shape[-2:])))
             for n, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    with torch.no_grad():
        model(example)
    for h in hooks:
        h.remove()
    swapped = 0
    for name, (i, o) in shapes.items():
        if i[0] % o[0] or i[1] % o[1]:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, _PoolAsMatmul(tuple(i), tuple(o)))
            swapped += 1
    return swapped


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Silence file descriptors 1 and 2 (C++ writers included). The TorchScript ONNX exporter
    leaves its C++ log switched on and prints the whole IR graph (hundreds of lines) on any
    failure; the exception's message already says what failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with open(os.devnull, "w") as null:
            for fd in saved:
                os.dup2(null.fileno(), fd)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def _export_onnx(model: nn.Module, example: torch.Tensor, path: str, opset: int,
                 output_name: str = OUTPUT_NAME) -> None:
    _replace_uneven_pools(model, example)
    with warnings.catch_warnings(), _quiet_native_output():
        # torch >= 2.9 flags the TorchScript-based exporter as legacy; the torch.export-based
        # one needs onnxscript, which is not a dependency. The output is checked below either way.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), path, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[output_name],
            dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
        )


def _run_onnx(path: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no per-optimizer warnings on the terminal
    try:
        # The CPU provider always: a GPU provider's TF32/fused kernels would blur the comparison.
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    except Exception as err:  # onnxruntime's pybind errors share no useful base class
        raise UserError(f"ONNX Runtime cannot run the exported model: {first_line(err)}") from None


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: str, opset: int,
                        output_name: str = OUTPUT_NAME) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated upstream; still widely deployed
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, path)


def _run_torchscript(path: str, x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            return torch.jit.load(path, map_location="cpu")(torch.from_numpy(x)).numpy()


def _export_pt2(model: nn.Module, example: torch.Tensor, path: str, opset: int,
                output_name: str = OUTPUT_NAME) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    # Through a file object: torch.export warns about paths not ending in .pt2 (atomic_write's temporary name).
    with open(path, "wb") as f:
        torch.export.save(program, f)


def _run_pt2(path: str, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        with open(path, "rb") as f:
            return torch.export.load(f).module()(torch.from_numpy(x)).numpy()


_EXPORTERS: dict[str, tuple[Callable, Callable]] = {
    "onnx": (_export_onnx, _run_onnx),
    "torchscript": (_export_torchscript, _run_torchscript),
    "pt2": (_export_pt2, _run_pt2),
}


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise UserError(f"ONNX export needs onnx and onnxruntime ({err.name} is missing): "
                        "pip install 'visionzoo[export]'") from None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # the export extra is optional for torchscript/pt2
        return None


def _class_names(cfg: RecipeConfig, n: int) -> list[str]:
    """Names of the ``n`` classes of released weights: the recipe's data set's when it is there
    and has ``n`` classes, else ImageNet-1k's synsets (timm's table, the ImageFolder folder names)
    for 1000, else "0".."n-1"."""
    from visionzoo.data.loading.build import build_datasets

    try:
        classes = build_datasets(cfg.data, train=False).classes
        if len(classes) == n:
            return list(classes)
    except UserError:
        pass
    if n == 1000:
        from timm.data import ImageNetInfo

        return list(ImageNetInfo().label_names())
    print(f"visionzoo: no class names for the {n} classes of the weights (the recipe's data is not there); "
          "the sidecar numbers them", flush=True)
    return [str(i) for i in range(n)]


def model_for_weights(checkpoint: str | None, weights: str, recipe: str | None,
                  overrides: list[str]) -> tuple[nn.Module, dict]:
    """The model and checkpoint-style metadata for ``--weights`` (any format models/weights.py
    reads) in the model of ``recipe`` or of the run folder ``checkpoint``."""
    from visionzoo.checkpoint import command_config
    from visionzoo.config import to_dict
    from visionzoo.models import create, model_args
    from visionzoo.models.weights import file_num_classes, model_from_weights

    cfg, _ = command_config(checkpoint, overrides, weights, recipe)
    ic = cfg.data.in_chans
    classes: list[str] = []
    n = 0
    if cfg.task != "dino":  # a classifier: as many outputs as its weights have classes
        probe_args = model_args(cfg.model, max(cfg.data.num_classes, 1), ic)
        n = file_num_classes(weights, create(probe_args), probe_args, cfg.model.checkpoint_key) or 0
        if n < 1:
            raise UserError(f"{weights} holds no classifier for {cfg.model.name}: export it with a DINO recipe "
                            "for features, or give classifier weights")
        classes = _class_names(cfg, n)
    model, args = model_from_weights(cfg.model, weights, n, ic)
    return model, {"config": to_dict(cfg), "model": args, "classes": classes, "task": cfg.task}


def _source(checkpoint: str | None, weights: str | None, recipe: str | None, overrides: list[str] | None) -> Source:
    """The model to export, its checkpoint-style metadata and the weights file it came from: the
    checkpoint (run folder or .safetensors), or ``weights`` in the model of ``recipe`` / of the run."""
    if weights:
        model, meta = model_for_weights(checkpoint, weights, recipe, list(overrides or []))
        return Source(model, meta, Path(weights).expanduser(), True)
    if recipe or overrides:
        raise UserError("--recipe and config overrides go with --weights; a checkpoint brings its own config")
    path = resolve_weights(checkpoint)
    model, meta = load_model(path)
    return Source(model, meta, path, False)


@dataclass(frozen=True)
class ExportOptions:
    """The flags of ``visionzoo export`` beside what to export and where. ``opset`` and
    ``tolerance``: None for DEFAULT_OPSET and DEFAULT_TOLERANCE. ``precision`` int8 or bf16 (ONNX
    only) writes the fp32 model and then ``<name>.int8.onnx`` / ``<name>.bf16.onnx`` beside it
    (quantize.py): int8 calibrated on ``calibration_images`` training images (of
    ``calibration_data`` when given) with ``calibration`` (percentile | minmax | entropy; default
    quantize.DEFAULT_CALIBRATION), for the CPUs of ``int8_target`` (quantize.INT8_TARGETS; default:
    this machine's). ``full_checkpoint``: with the dino layout, DINO's training checkpoint too."""

    opset: int | None = None
    tolerance: float | None = None
    precision: str = "fp32"
    calibration_images: int | None = None
    calibration: str | None = None
    calibration_data: str | None = None
    int8_target: str | None = None
    full_checkpoint: bool = False


def export_checkpoint(
    checkpoint: str | None, fmt: str = "onnx", output: str | None = None, weights: str | None = None,
    recipe: str | None = None, overrides: list[str] | None = None, options: ExportOptions | None = None,
) -> dict:
    """``visionzoo export``: write the checkpoint (a run folder or a .safetensors file), or
    ``weights`` in the model of ``recipe`` / of the run folder, as ``fmt`` with its sidecar,
    after checking the exported model against PyTorch; return the sidecar. ``options``: opset,
    tolerance, low precision (ExportOptions). An ``output`` named ``X.int8.onnx`` names the int8
    file; its fp32 reference is then ``X.onnx``.

    ``fmt`` hf, torchvision, dino or mmcls writes the weights in that library's layout instead
    (export_weights)."""
    from visionzoo.config import from_dict

    opts = options or ExportOptions()
    if fmt not in FORMATS and fmt not in LAYOUTS:
        raise UserError(f"unknown export format '{fmt}' (have: {', '.join([*FORMATS, *LAYOUTS])})")
    check_layout_flags(fmt, opts.full_checkpoint, bool(weights), {
        "--opset": opts.opset, "--precision": opts.precision != "fp32",
        "--calibration-images": opts.calibration_images, "--calibration": opts.calibration,
        "--calibration-data": opts.calibration_data, "--int8-target": opts.int8_target})
    tolerance = DEFAULT_TOLERANCE if opts.tolerance is None else opts.tolerance
    if fmt in LAYOUTS:  # the weights in a library's layout (export_layouts.py)
        src = _source(checkpoint, weights, recipe, overrides)
        return export_weights(src, fmt, input_size(from_dict(src.meta["config"]).data), output, tolerance,
                              opts.full_checkpoint)
    low = _check_precision(fmt, opts)
    if output is not None and low is not None and output.endswith(f".{opts.precision}.onnx"):
        output = output.removesuffix(f".{opts.precision}.onnx") + ".onnx"  # --output names the low-precision file
    opset = DEFAULT_OPSET if opts.opset is None else opts.opset
    if fmt == "onnx":
        _require_onnx()
        if not ONNX_MIN_OPSET <= opset <= ONNX_MAX_OPSET:
            raise UserError(f"--opset {opset} is outside what the exporter writes ({ONNX_MIN_OPSET}-{ONNX_MAX_OPSET})")
    src = _source(checkpoint, weights, recipe, overrides)
    _check_exportable(src, opts.precision)
    out_path = _output_path(src.path, fmt, output)
    sidecar = _export_graph(src, fmt, opset, tolerance, out_path)
    if low is not None:
        sidecar = _low_precision(out_path, sidecar, from_dict(src.meta["config"]).data, opts, low)
    return sidecar


class _LowPrecision(NamedTuple):
    """What a checked ``--precision`` int8 / bf16 resolves to before anything is exported."""

    session_options: dict[str, str]  # ONNX Runtime session config entries (bf16's kernels)
    target: Int8Target | None  # for int8


def _check_precision(fmt: str, opts: ExportOptions) -> _LowPrecision | None:
    """The low-precision flags checked (before the slow export): None for fp32."""
    from visionzoo.commands import quantize

    precision = opts.precision
    if precision not in quantize.PRECISIONS:
        raise UserError(f"unknown precision '{precision}' (have: {', '.join(quantize.PRECISIONS)})")
    if precision != "fp32" and fmt != "onnx":
        raise UserError(f"--precision {precision} is for ONNX exports (ONNX Runtime runs it); not --format {fmt}")
    if opts.int8_target is not None and precision != "int8":
        raise UserError(f"--int8-target is for --precision int8 (this export is {precision})")
    if precision == "fp32":
        return None
    target = quantize.resolve_int8_target(opts.int8_target) if precision == "int8" else None
    return _LowPrecision(quantize.bf16_session_options() if precision == "bf16" else {}, target)


def _is_backbone(meta: dict) -> bool:
    """A DINO run's weights are the teacher backbone: it exports as a feature extractor."""
    return meta.get("task", meta["config"].get("task", "supervised")) == "dino"


def _check_exportable(src: Source, precision: str) -> None:
    """A backbone exports in fp32 only; a classifier needs its class names."""
    if _is_backbone(src.meta) and precision != "fp32":
        raise UserError(f"--precision {precision} is for classifiers; {src.path} is a DINO backbone")
    if not _is_backbone(src.meta) and not src.meta.get("classes"):
        raise UserError(f"{src.path} holds no class names: it is not a classifier checkpoint visionzoo wrote")


def _parity(fmt: str, got: np.ndarray, reference: np.ndarray, tolerance: float, name: str) -> dict:
    """The parity record of the exported model's outputs ``got`` against PyTorch's; a UserError
    when they differ beyond the tolerance (relative to the largest logit)."""
    same_shape = got.shape == reference.shape
    diff = float(np.max(np.abs(got.astype(np.float64) - reference))) if same_shape else float("inf")
    limit = tolerance * max(1.0, float(np.max(np.abs(reference))))
    if not diff <= limit:  # also catches NaN
        raise UserError(f"{fmt} export of {name} does not match PyTorch: max abs "
                        f"difference {diff:.3g} on a random batch of {CHECK_BATCH} (limit {limit:.3g} = "
                        f"tolerance {tolerance:g} x max(1, max |logit|)); nothing written")
    return {"max_abs_diff": diff, "tolerance": tolerance, "limit": limit, "batch": CHECK_BATCH,
            "runtime": "onnxruntime CPUExecutionProvider" if fmt == "onnx" else f"torch {fmt}"}


def _export_graph(src: Source, fmt: str, opset: int, tolerance: float, out_path: Path) -> dict:
    """Write the model of ``src`` as ``fmt`` to ``out_path`` when it matches PyTorch on a random
    batch (nothing is kept when it does not), then its sidecar; return the sidecar."""
    from visionzoo.config import from_dict

    features, meta = _is_backbone(src.meta), src.meta
    model, name = src.model.float().eval(), meta["model"]["name"]
    size, chans = input_size(from_dict(meta["config"]).data), int(meta["model"]["in_chans"])
    # Random images in normalised units, like real preprocessed inputs; seeded for reruns.
    g = torch.Generator().manual_seed(0)
    example = torch.randn(TRACE_BATCH, chans, size, size, generator=g)
    check = torch.randn(CHECK_BATCH, chans, size, size, generator=g)
    with torch.no_grad():
        reference = model(check).float().numpy()
    export_fn, run_fn = _EXPORTERS[fmt]
    parity: dict = {}

    def write(tmp: str) -> None:
        try:
            with torch.no_grad():
                export_fn(model, example, tmp, opset, FEATURES_NAME if features else OUTPUT_NAME)
        except (RuntimeError, ValueError, NotImplementedError) as err:
            # Unsupported operators, data-dependent control flow, bad opsets: one line, no traceback.
            raise UserError(f"{fmt} export of {name} failed: {first_line(err)}") from None
        parity.update(_parity(fmt, run_fn(tmp, check.numpy()), reference, tolerance, name))

    atomic_write(out_path, write)
    dims = int(reference.shape[-1])
    sidecar = _graph_sidecar(src, fmt, opset, out_path, dims, parity)
    side = sidecar_path(out_path)
    atomic_write(side, lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n"))
    what = (f"DINO teacher backbone: [CLS] features of {dims} dims, no classifier"
            if features else f"{len(sidecar['classes'])} classes")
    print(f"{out_path}: {fmt} export of {meta['model']['library']} {name} "
          f"(input [batch, {chans}, {size}, {size}], {what}); parity vs PyTorch: "
          f"max abs diff {parity['max_abs_diff']:.2e} (limit {parity['limit']:.2e}); sidecar {side}")
    return sidecar


def _graph_sidecar(src: Source, fmt: str, opset: int, out_path: Path, dims: int, parity: dict) -> dict:
    """The sidecar of the exported file ``out_path``: input, preprocessing, classes, the resolved
    data section, the source checkpoint, the parity record, versions. ``dims``: the model's outputs."""
    from visionzoo.config import absolute_data_path, from_dict, to_dict
    from visionzoo.version import __version__

    meta, features = src.meta, _is_backbone(src.meta)
    cfg = from_dict(meta["config"])
    d = cfg.data
    size, chans, classes = input_size(d), int(meta["model"]["in_chans"]), list(meta["classes"])
    return {
        "format": fmt,
        "file": out_path.name,
        "sha256": sha256_file(out_path),
        "opset": opset if fmt == "onnx" else None,
        "precision": "fp32",
        "input": {"name": INPUT_NAME, "shape": ["batch", chans, size, size], "dtype": "float32"},
        "output": {"name": FEATURES_NAME if features else OUTPUT_NAME, "kind": "features" if features else "logits",
                   "shape": ["batch", dims if features else len(classes)]},
        "preprocess": {
            "in_chans": chans, "image_mode": "L" if chans == 1 else "RGB", "input_size": size,
            "resize": d.test_resize, "crop": d.test_size if d.test_resize > 0 else None,
            "interpolation": d.interpolation, "mean": list(d.mean), "std": list(d.std), "pixel_range": "0-255",
        },
        "classes": classes,
        "recipe": cfg.recipe,
        "data": {**to_dict(cfg)["data"], "path": absolute_data_path(d.path)},  # infer from any folder
        "model": meta["model"],
        "checkpoint": {"path": str(src.path.resolve()), "sha256": sha256_file(src.path),
                       "epoch": meta.get("epoch"), "acc1": meta.get("acc1")},
        "parity": parity,
        "versions": {"visionzoo": __version__, "torch": torch.__version__,
                     **{pkg: _version(pkg) for pkg in ("onnx", "onnxruntime")}},
    }


def _low_precision(fp32_path: Path, fp32_sidecar: dict, d: DataConfig, opts: ExportOptions,
                   low: _LowPrecision) -> dict:
    """The int8 (or bf16) model beside the fp32 ``fp32_path`` and its sidecar, which names the
    fp32 model as the reference ``infer`` compares accuracy with."""
    import shutil

    from visionzoo.commands import quantize

    precision = opts.precision
    path = fp32_path.with_name(fp32_path.stem + f".{precision}.onnx")
    extra: dict = {"session_options": low.session_options}
    if precision == "int8":
        n = quantize.DEFAULT_CALIBRATION_IMAGES if opts.calibration_images is None else opts.calibration_images
        calib, check = quantize.calibration_sets(d, n, opts.calibration_data)
        method = opts.calibration or quantize.DEFAULT_CALIBRATION

        def write(tmp: str) -> None:
            extra["quantization"] = quantize.quantize_int8(fp32_path, tmp, calib, method, low.target)
            extra["parity"] = quantize.int8_agreement(fp32_path, tmp, check, low.target)
    else:
        def write(tmp: str) -> None:  # the same graph; ONNX Runtime computes it in bf16 (session option)
            shutil.copyfile(fp32_path, tmp)
            extra["parity"] = {"reference": "the fp32 ONNX model", "note": "same graph, bf16 matrix kernels"}

    atomic_write(path, write)
    sidecar = {**fp32_sidecar, "file": path.name, "sha256": sha256_file(path), "precision": precision, **extra,
               "reference": {"file": fp32_path.name, "sha256": fp32_sidecar["sha256"], "precision": "fp32"}}
    side = sidecar_path(path)
    atomic_write(side, lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n"))
    p = sidecar["parity"]
    agree = (f"top-1 agreement with fp32 {100 * p['top1_agreement']:.1f}% on {p['images']} validation images"
             if "top1_agreement" in p else p["note"])
    q = sidecar.get("quantization")
    how = (f"static QDQ, {'7' if q['reduce_range'] else '8'}-bit weights for {q['target']} CPUs, "
           f"{q['calibration']} calibration on {q['calibration_images']} training images; ") if q else ""
    print(f"{path}: {precision} model ({how}{agree}); sidecar {side}")
    print(f"visionzoo: wrote the {precision} model {path} and its fp32 reference {fp32_path} "
          f"(infer compares the two)", flush=True)
    return sidecar
