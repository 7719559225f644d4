"""Low-precision ONNX models for CPU inference: ONNX Runtime's static int8 quantisation (QDQ,
per-channel weights, activations calibrated on training images) and bf16 where ONNX Runtime's
CPU provider computes in bf16.

``visionzoo export --precision int8`` writes the fp32 model first (checked against PyTorch as
usual), then quantises it: ``quantize_static`` with QuantFormat.QDQ, int8 weights per output
channel, uint8 activations (the U8S8 pair ONNX Runtime's x86 kernels run with VNNI), their
ranges calibrated on N training-split images preprocessed with the eval transform. The int8
model is then compared with the fp32 one on a fixed set of validation images (top-1
agreement); its sidecar records the method, N and that agreement, and names the fp32 model,
so that ``visionzoo infer`` reports both models' Acc@1 on the same split."""

from __future__ import annotations

import importlib
import io
import platform
import tempfile
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import torch

from visionzoo.errors import UserError, first_line

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


def bf16_session_options() -> dict[str, str]:
    """The session config entries that make ONNX Runtime compute in bf16 on this machine; a
    UserError where its CPU provider has no bf16 path (x86)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return {ARM_BF16_OPTION: "1"}
    raise UserError(f"--precision bf16: ONNX Runtime's CPU provider has bf16 matrix kernels only on Arm "
                    f"(this is {platform.machine()}); use --precision int8, or bf16 in PyTorch (visionzoo eval --amp bf16)")


def _images(ds, indices, transform) -> np.ndarray:
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


def calibration_sets(d, n: int, data: str | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, check) image arrays: ``n`` training-split images and AGREEMENT_IMAGES
    validation images of the recipe's data (``data`` overrides its folder), both preprocessed
    with the eval transform, each drawn in a seeded random order (ImageFolder lists a class at a
    time, so the first N would be one class)."""
    from dataclasses import replace

    from visionzoo.data.loading.build import build_datasets
    from visionzoo.data.augment.presets import eval_transform

    if n < 1:
        raise UserError(f"--calibration-images must be >= 1, got {n}")
    if data:
        d = replace(d, path=data)
    if d.name in ("webdataset", "hfds", "synthetic"):
        raise UserError(f"int8 calibration reads training images by index: data.name={d.name} has no such "
                        "split; pass --data with an ImageFolder, CIFAR or (Fashion-)MNIST folder")
    try:
        splits = build_datasets(d, train=True)
    except UserError as err:
        raise UserError(f"int8 calibration needs the recipe's training images ({err}); pass --data PATH") from None
    g = np.random.default_rng(seed)
    transform = eval_transform(d)
    calib = _images(splits.train, g.permutation(len(splits.train))[:n], transform)
    check = _images(splits.val, g.permutation(len(splits.val))[:AGREEMENT_IMAGES], transform)
    return calib, check


def _session(path: str | Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_batches(session, x: np.ndarray, batch: int = CALIBRATION_BATCH) -> np.ndarray:
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


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calib: np.ndarray, method: str) -> dict:
    """Statically quantise the ONNX model ``fp32_path`` into ``out_path`` (QDQ, per-channel int8
    weights, uint8 activations calibrated with ``method`` on ``calib``); returns the
    sidecar's description of it."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise UserError(f"unknown calibration method '{method}' (have: {', '.join(CALIBRATION_METHODS)})")
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
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                                extra_options={"CalibTensorRangeSymmetric": False})
        except Exception as err:  # onnxruntime's quantisation raises plain Exceptions of many kinds
            raise UserError(f"int8 quantisation failed: {first_line(err)}") from None
    return {"method": "onnxruntime quantize_static", "format": "QDQ", "weights": "int8 per-channel (symmetric)",
            "activations": "uint8 per-tensor", "calibration": method, "calibration_images": int(len(calib)),
            "calibration_options": CALIBRATION_OPTIONS[method],
            "calibration_split": "train", "calibration_transform": "eval"}


def int8_agreement(fp32_path: str | Path, int8_path: str | Path, check: np.ndarray) -> dict:
    """Top-1 agreement (fraction of ``check`` images) of the int8 model with its fp32 one;
    a UserError below MIN_AGREEMENT."""
    ref = run_batches(_session(fp32_path), check).argmax(1)
    got = run_batches(_session(int8_path), check).argmax(1)
    agreement = float((ref == got).mean())
    result = {"top1_agreement": agreement, "images": int(len(check)), "split": "val", "min_agreement": MIN_AGREEMENT,
              "runtime": "onnxruntime CPUExecutionProvider", "reference": "the fp32 ONNX model"}
    if agreement < MIN_AGREEMENT:
        raise UserError(f"the int8 model's top-1 agrees with the fp32 model's on only {100 * agreement:.1f}% of "
                        f"{len(check)} validation images (minimum {100 * MIN_AGREEMENT:.0f}%); try "
                        "another --calibration or more --calibration-images; nothing written")
    return result


def reference_session(model_path: Path, meta: dict):
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
