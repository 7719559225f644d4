"""Low-precision ONNX models for CPU inference: ONNX Runtime's static int8 quantisation (QDQ,
per-channel weights, activations calibrated on training images) and bf16 where ONNX Runtime's
CPU provider computes in bf16.

``visionzoo export --precision int8`` writes the fp32 model first (checked against PyTorch as
usual), then quantises it: ``quantize_static`` with QuantFormat.QDQ, int8 weights per output
channel, uint8 activations, their ranges calibrated on N training-split images preprocessed
with the eval transform. The int8 model is then compared with the fp32 one on a fixed set of
validation images (top-1 agreement); its sidecar records the method, N, that agreement and the
CPU it was made for, and names the fp32 model, so that ``visionzoo infer`` reports both models'
Acc@1 on the same split.

The CPU matters (``--int8-target``, INT8_TARGETS): ONNX Runtime multiplies uint8 activations by
int8 weights with VNNI (AVX512-VNNI, AVX-VNNI, AMX) where the CPU has it, accumulating in int32;
x86 CPUs without it (AVX2, AVX512 without VNNI) add pairs of u8×s8 products in int16 first,
which saturates with full 8-bit weights. A model for those CPUs therefore has 7-bit weights
(``reduce_range``; measured in BENCHMARKS.md against uint8 weights). The default target is the
exporting machine's CPU."""

from __future__ import annotations

import importlib
import io
import platform
import tempfile
from collections.abc import Callable, Mapping
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from visionzoo.errors import UserError, first_line

if TYPE_CHECKING:
    from onnxruntime import InferenceSession
    from torch.utils.data import Dataset

    from visionzoo.config import DataConfig

PRECISIONS = ("fp32", "int8", "bf16")
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
DEFAULT_CALIBRATION_IMAGES = 512
AGREEMENT_IMAGES = 256  # validation images the int8 model's top-1 is compared on (fixed: the first of a seeded order)
MIN_AGREEMENT = 0.90  # below: the quantised model is refused (nothing written)
CALIBRATION_BATCH = 64
# The histogram methods' settings, passed to ONNX Runtime's calibrator (_calibrator_options) and
# recorded in the sidecar. Its entropy default, 128 histogram bins for 128 quantised bins, leaves
# one candidate threshold, the full range: minmax's model, byte for byte. The KL-divergence method
# searches thresholds over a fine histogram (TensorRT's 2048 bins) for 128 quantised bins.
CALIBRATION_OPTIONS = {"minmax": {}, "entropy": {"num_bins": 2048, "num_quantized_bins": 128},
                       "percentile": {"num_bins": 2048, "percentile": 99.999}}
# percentile: measured best of the three (BENCHMARKS.md: -0.08 pt on the demo model, +0.30 pt on
# ResNet-50, where minmax lost 1.05 pt and entropy's KL thresholds clip too much)
DEFAULT_CALIBRATION = "percentile"
# ONNX Runtime's CPU provider computes fp32 MatMul/Conv (MLAS) in bf16 on Arm with this session
# option; on x86 it has no bf16 kernels for convolutions, so bf16 is refused there.
ARM_BF16_OPTION = "mlas.enable_gemm_fastmath_arm64_bfloat16"


@dataclass(frozen=True)
class Int8Target:
    """How an int8 model is quantised for one kind of CPU."""

    name: str
    cpus: str  # the CPUs it is for, in words
    activations: str  # "uint8"
    weights: str  # "int8" (signed, symmetric per channel)
    reduce_range: bool  # 7-bit weights: no int16 saturation in u8×s8 kernels without VNNI
    why: str


INT8_TARGETS = {
    "x86": Int8Target("x86", "any x86-64 CPU (AVX2, AVX512 with or without VNNI)", "uint8", "int8", True,
                      "without VNNI, ONNX Runtime adds pairs of u8×s8 products in int16, which saturates with "
                      "8-bit weights; 7-bit weights cannot"),
    "x86-vnni": Int8Target("x86-vnni", "x86-64 CPUs with VNNI (AVX512-VNNI, AVX-VNNI, AMX)", "uint8", "int8", False,
                           "VNNI accumulates u8×s8 products in int32: full 8-bit weights"),
    "arm": Int8Target("arm", "64-bit Arm CPUs", "uint8", "int8", False,
                      "Arm's u8×s8 kernels widen before they add: full 8-bit weights"),
}
INT8_TARGET_CHOICES = ("auto", *INT8_TARGETS)


def cpu_capabilities() -> Mapping:
    """This CPU's features as torch's cpuinfo reports them (torch >= 2.8), else the flags of
    /proc/cpuinfo, else none; "architecture" is always there."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        return caps()
    found: dict = {"architecture": platform.machine().lower()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                found.update({flag: True for flag in line.split(":", 1)[1].split()})
                break
    except OSError:
        pass
    return found


def has_vnni(caps: Mapping) -> bool:
    """Whether ONNX Runtime's u8×s8 kernels accumulate in int32 on a CPU with ``caps``: VNNI in
    one of its forms (cpuinfo's names and /proc/cpuinfo's)."""
    return any(caps.get(flag) for flag in ("avx512_vnni", "avx512vnni", "avx_vnni", "avxvnni", "amx_int8"))


def is_arm(caps: Mapping) -> bool:
    return str(caps.get("architecture", platform.machine())).lower() in ("arm64", "aarch64", "armv8", "arm")


def detect_int8_target(caps: Mapping | None = None) -> str:
    """The INT8_TARGETS entry for the CPU with ``caps`` (default: this one)."""
    caps = cpu_capabilities() if caps is None else caps
    if is_arm(caps):
        return "arm"
    return "x86-vnni" if has_vnni(caps) else "x86"


def resolve_int8_target(name: str | None) -> Int8Target:
    """``--int8-target``: a name of INT8_TARGETS, or auto / None for this machine's CPU."""
    if name in (None, "auto"):
        return INT8_TARGETS[detect_int8_target()]
    if name not in INT8_TARGETS:
        raise UserError(f"unknown --int8-target '{name}' (have: {', '.join(INT8_TARGET_CHOICES)})")
    return INT8_TARGETS[name]


def saturates_on(reduce_range: bool, caps: Mapping | None = None) -> bool:
    """Whether a model with full 8-bit weights (``reduce_range`` False) can saturate on the CPU
    with ``caps`` (default: this one): an x86 CPU without VNNI."""
    caps = cpu_capabilities() if caps is None else caps
    return not reduce_range and not is_arm(caps) and not has_vnni(caps)


def target_warning(quantization: Mapping, caps: Mapping | None = None) -> str | None:
    """One line when an int8 model with full 8-bit weights (made for VNNI or Arm) runs on an x86
    CPU without VNNI, where its products can saturate; None otherwise. Models exported before
    targets were recorded have 8-bit weights too."""
    if not saturates_on(bool(quantization.get("reduce_range", False)), caps):
        return None
    made_for = f"--int8-target {quantization['target']}" if quantization.get("target") else "an older visionzoo"
    return (f"this int8 model has 8-bit weights ({made_for}), for CPUs with VNNI or Arm; this CPU has no VNNI, so its "
            "u8×s8 products can saturate and its accuracy drop: export it again with --int8-target x86")


def bf16_session_options() -> dict[str, str]:
    """The session config entries that make ONNX Runtime compute in bf16 on this machine; a
    UserError where its CPU provider has no bf16 path (x86)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return {ARM_BF16_OPTION: "1"}
    raise UserError(f"--precision bf16: ONNX Runtime's CPU provider has bf16 matrix kernels only on Arm "
                    f"(this is {platform.machine()}); use --precision int8, or bf16 in PyTorch "
                    f"(visionzoo eval --amp bf16)")


def eval_images(ds: Dataset, indices: np.ndarray, transform: Callable) -> np.ndarray:
    """The images ``indices`` of a map-style dataset as normalised float32 [N, C, H, W]: each one
    through the eval transform and its normalisation, unreadable ones skipped."""
    ds.transform = transform
    out = []
    for i in indices:
        item = ds[int(i)]
        if item is not None:
            out.append(transform.normalize(item[0]).float())
    if not out:
        raise UserError("no readable images to calibrate the int8 model on")
    return torch.stack(out).numpy().astype(np.float32)


def calibration_sets(d: DataConfig, n: int, data: str | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, check) image arrays: ``n`` training-split images and AGREEMENT_IMAGES
    validation images of the recipe's data (``data`` overrides its folder), both preprocessed
    with the eval transform, each drawn in a seeded random order (ImageFolder lists a class at a
    time, so the first N would be one class)."""
    from dataclasses import replace

    from visionzoo.data.augment.presets import eval_transform
    from visionzoo.data.loading.build import build_datasets, with_packed_format
    from visionzoo.data.sources.table import data_source

    if n < 1:
        raise UserError(f"--calibration-images must be >= 1, got {n}")
    if data:
        d = replace(d, path=data)
    d = with_packed_format(d)
    source = data_source(d.name)
    if not source.map_style or source.generated:  # shard streams; random images calibrate nothing
        raise UserError(f"int8 calibration reads training images by index: data.name={d.name} has no such "
                        "split; pass --data with an ImageFolder, CIFAR or (Fashion-)MNIST folder")
    try:
        splits = build_datasets(d, train=True)
    except UserError as err:
        raise UserError(f"int8 calibration needs the recipe's training images ({err}); pass --data PATH") from None
    g = np.random.default_rng(seed)
    transform = eval_transform(d)
    calib = eval_images(splits.train, g.permutation(len(splits.train))[:n], transform)
    check = eval_images(splits.val, g.permutation(len(splits.val))[:AGREEMENT_IMAGES], transform)
    return calib, check


def _session(path: str | Path) -> InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_batches(session: InferenceSession, x: np.ndarray, batch: int = CALIBRATION_BATCH) -> np.ndarray:
    """Logits of ``x`` through an ONNX Runtime session, ``batch`` images a call."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


@contextmanager
def _calibrator_options(options: dict):
    """Inside: ONNX Runtime's quantize_static builds its calibrator with ``options`` added to the
    few calibration options it forwards itself (it drops num_bins and num_quantized_bins)."""
    # the module, not the package's function of the same name
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
    build = ort_quantize.create_calibrator

    def with_options(*args, **kwargs):
        kwargs["extra_options"] = {**(kwargs.get("extra_options") or {}), **options}
        return build(*args, **kwargs)

    ort_quantize.create_calibrator = with_options
    try:
        yield
    finally:
        ort_quantize.create_calibrator = build


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calib: np.ndarray, method: str,
                  target: Int8Target | None = None) -> dict:
    """Statically quantise the ONNX model ``fp32_path`` into ``out_path`` for the CPUs of
    ``target`` (default: this machine's): QDQ, per-channel weights, activations calibrated with
    ``method`` on ``calib``. Returns the sidecar's description of it."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise UserError(f"unknown calibration method '{method}' (have: {', '.join(CALIBRATION_METHODS)})")
    target = target or resolve_int8_target("auto")
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    session = _session(fp32_path)
    name = session.get_inputs()[0].name

    # Batches of one size: ONNX Runtime's histogram collectors (entropy, percentile) stack every
    # batch's outputs into one array and fail on a shorter last batch.
    batch = max(b for b in range(1, min(CALIBRATION_BATCH, len(calib)) + 1) if len(calib) % b == 0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calib[i:i + batch] for i in range(0, len(calib), batch))

        def get_next(self):  # noqa: ANN201 - ONNX Runtime's interface
            x = next(self.batches, None)
            return None if x is None else {name: x}

    with tempfile.TemporaryDirectory() as tmp:
        # Shape inference and graph optimisation first (ONNX Runtime's recommended pre-processing):
        # BatchNorm is folded into the convolutions, so one scale per channel covers both.
        pre = str(Path(tmp) / "pre.onnx")
        try:
            quant_pre_process(str(fp32_path), pre)
            # redirect: the histogram calibrators print their bin counts
            with _calibrator_options(CALIBRATION_OPTIONS[method]), redirect_stdout(io.StringIO()):
                quantize_static(pre, str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=types[target.activations], weight_type=types[target.weights],
                                reduce_range=target.reduce_range,
                                calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                                extra_options={"CalibTensorRangeSymmetric": False})
        except Exception as err:  # onnxruntime's quantisation raises plain Exceptions of many kinds
            raise UserError(f"int8 quantisation failed: {first_line(err)}") from None
    bits = 7 if target.reduce_range else 8
    return {"method": "onnxruntime quantize_static", "format": "QDQ",
            "weights": f"{target.weights} per-channel ({'symmetric' if target.weights == 'int8' else 'asymmetric'}, "
                       f"{bits} bits)",
            "activations": f"{target.activations} per-tensor", "target": target.name, "target_cpus": target.cpus,
            "reduce_range": target.reduce_range, "target_why": target.why,
            "exported_on": detect_int8_target(), "calibration": method, "calibration_images": int(len(calib)),
            "calibration_options": CALIBRATION_OPTIONS[method],
            "calibration_split": "train", "calibration_transform": "eval"}


def int8_agreement(fp32_path: str | Path, int8_path: str | Path, check: np.ndarray,
                   target: Int8Target | None = None) -> dict:
    """Top-1 agreement (fraction of ``check`` images) of the int8 model with its fp32 one, on
    this CPU; a UserError below MIN_AGREEMENT. Where this CPU saturates and the ``target``'s
    does not (8-bit weights checked on x86 without VNNI), the figure is a lower bound: recorded
    and said, never a refusal."""
    ref = run_batches(_session(fp32_path), check).argmax(1)
    got = run_batches(_session(int8_path), check).argmax(1)
    agreement = float((ref == got).mean())
    result = {"top1_agreement": agreement, "images": int(len(check)), "split": "val", "min_agreement": MIN_AGREEMENT,
              "runtime": "onnxruntime CPUExecutionProvider", "reference": "the fp32 ONNX model",
              "checked_on": detect_int8_target()}
    if target is not None and saturates_on(target.reduce_range):
        result["note"] = (f"checked on an x86 CPU without VNNI, where 8-bit weights can saturate; on {target.cpus} "
                          "they do not, so the agreement there is at least this")
        print(f"visionzoo: warning: the int8 model for {target.name} was checked on this CPU without VNNI, where it "
              f"can saturate: top-1 agreement {100 * agreement:.1f}% here is a lower bound for its target", flush=True)
        return result
    if agreement < MIN_AGREEMENT:
        raise UserError(f"the int8 model's top-1 agrees with the fp32 model's on only {100 * agreement:.1f}% of "
                        f"{len(check)} validation images (minimum {100 * MIN_AGREEMENT:.0f}%); try "
                        "another --calibration or more --calibration-images; nothing written")
    return result


def reference_session(model_path: Path, meta: dict) -> InferenceSession | None:
    """The fp32 ONNX model a low-precision export names as its reference (same folder), or None
    with a printed reason: ``infer`` then reports the low-precision model's accuracy alone."""
    from visionzoo.checkpoint import sha256_file

    ref = meta.get("reference")
    if not ref:
        return None
    path = Path(ref["file"])  # a file name beside the model (an absolute path is taken as it is)
    path = path if path.is_absolute() else model_path.with_name(ref["file"])
    if not path.is_file():
        print(f"visionzoo: the fp32 reference {path.name} is not next to {model_path.name}: reporting "
              f"the {meta.get('precision')} model's accuracy alone", flush=True)
        return None
    if ref.get("sha256") and sha256_file(path) != ref["sha256"]:
        print(f"visionzoo: {path.name} is not the fp32 model {model_path.name} was quantised from (sha256 "
              f"differs): reporting the {meta.get('precision')} model's accuracy alone", flush=True)
        return None
    return _session(path)
