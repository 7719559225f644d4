"""int8 and bf16 exports for CPU inference: a trained Fashion-MNIST run exports a statically
quantised QDQ model (per-channel weights) whose top-1 agrees with the fp32 model's on a fixed
batch, whose sidecar records the calibration, and which ``infer`` measures next to the fp32
model; bf16 is refused with one line where ONNX Runtime has no bf16 kernels."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from visionzoo.cli import main  # noqa: E402
from visionzoo.export import sha256_file  # noqa: E402
from visionzoo.quantize import calibration_sets, run_batches  # noqa: E402


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, fmnist_dir: Path) -> Path:
    run = tmp_path_factory.mktemp("q") / "run"
    assert main(["train", "fashion_mnist", "--data", str(fmnist_dir), "--epochs", "1", "--batch-size", "32",
                 "--device", "cpu", "--amp", "none", "--output", str(run)]) == 0
    return run


def test_int8_export_agrees_with_fp32_and_records_its_calibration(trained_run: Path, fmnist_dir: Path, capsys) -> None:
    run = trained_run
    assert main(["export", str(run), "--precision", "int8", "--calibration-images", "96"]) == 0
    out = capsys.readouterr().out
    assert "int8 model (static QDQ, percentile calibration on 96 training images" in out
    fp32, int8 = run / "model.onnx", run / "model.int8.onnx"
    side = json.loads((run / "model.int8.json").read_text())
    assert json.loads((run / "model.json").read_text())["precision"] == "fp32"
    assert side["precision"] == "int8" and side["file"] == "model.int8.onnx" and side["sha256"] == sha256_file(int8)
    q = side["quantization"]
    assert q["format"] == "QDQ" and q["calibration"] == "percentile" and q["calibration_images"] == 96
    assert q["calibration_options"] == {"num_bins": 2048, "percentile": 99.999}
    assert q["calibration_split"] == "train" and q["calibration_transform"] == "eval"
    assert side["reference"] == {"file": "model.onnx", "sha256": sha256_file(fp32), "precision": "fp32"}
    assert side["parity"]["images"] == 200 and side["parity"]["top1_agreement"] >= 0.9
    assert side["classes"] == json.loads((run / "model.json").read_text())["classes"]

    # QDQ with one scale per output channel for every convolution weight.
    graph = onnx.load(str(int8)).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {i.name: i for i in graph.initializer}
    conv_weights = {n.input[1] for n in graph.node if n.op_type == "Conv"}
    dq_of = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    assert conv_weights and all(w in dq_of for w in conv_weights)
    for w in conv_weights:
        scale = onnx.numpy_helper.to_array(inits[dq_of[w].input[1]])
        weight = onnx.numpy_helper.to_array(inits[dq_of[w].input[0]])
        assert weight.dtype == np.int8 and scale.shape == (weight.shape[0],)

    # Top-1 agreement on a fixed batch, independently of the export's own check.
    cfg_data = json.loads((run / "model.json").read_text())["data"]
    from visionzoo.config import from_dict

    d = from_dict({"recipe": "fashion_mnist", "data": cfg_data}).data
    _, check = calibration_sets(d, 1, str(fmnist_dir), seed=1)
    opts = ort.SessionOptions()
    a = run_batches(ort.InferenceSession(str(fp32), opts, providers=["CPUExecutionProvider"]), check).argmax(1)
    b = run_batches(ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"]), check).argmax(1)
    assert (a == b).mean() >= 0.9

    # infer reports the int8 model's Acc@1 next to the fp32 model's, on the same images.
    assert main(["infer", str(fp32), "--data", str(fmnist_dir)]) == 0
    fp32_result = json.loads((run / "model.infer.json").read_text())
    assert main(["infer", str(int8), "--data", str(fmnist_dir)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((run / "model.int8.infer.json").read_text())
    assert result["precision"] == "int8" and result["fp32_acc1"] == fp32_result["acc1"]
    assert result["fp32_ms_per_image"] > 0 and "x the fp32 model's speed in ONNX Runtime" in printed
    assert abs(result["acc1"] - result["fp32_acc1"]) <= 10.0
    assert f"int8 Acc@1 {result['acc1']:.2f}% | fp32 Acc@1 {fp32_result['acc1']:.2f}%" in printed

    # Without its fp32 model next to it, infer says so and reports the int8 accuracy alone.
    fp32.rename(run / "elsewhere.onnx")
    try:
        assert main(["infer", str(int8), "--data", str(fmnist_dir)]) == 0
        assert "fp32 reference model.onnx is not next to" in capsys.readouterr().out
        assert "fp32_acc1" not in json.loads((run / "model.int8.infer.json").read_text())
    finally:
        (run / "elsewhere.onnx").rename(fp32)


def _activation_scales(path: Path) -> dict[str, float]:
    """The scale of every activation QuantizeLinear of a QDQ model, by the tensor it quantises."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def test_each_calibration_method_sets_its_own_ranges(trained_run: Path, fmnist_dir: Path, tmp_path: Path) -> None:
    # ONNX Runtime's entropy defaults alone (128 bins for 128 levels) give minmax's ranges exactly.
    from visionzoo.config import from_dict
    from visionzoo.quantize import quantize_int8

    fp32 = trained_run / "model.onnx"
    if not fp32.is_file():
        assert main(["export", str(trained_run)]) == 0
    d = from_dict({"recipe": "fashion_mnist", "data": json.loads((trained_run / "model.json").read_text())["data"]}).data
    calib, _ = calibration_sets(d, 64, str(fmnist_dir))
    scales = {}
    for method in ("minmax", "entropy", "percentile"):
        info = quantize_int8(fp32, tmp_path / f"{method}.onnx", calib, method)
        assert info["calibration"] == method
        scales[method] = _activation_scales(tmp_path / f"{method}.onnx")
    assert scales["minmax"].keys() == scales["entropy"].keys() == scales["percentile"].keys()
    for method in ("entropy", "percentile"):
        narrower = [k for k, v in scales[method].items() if v < scales["minmax"][k] * 0.99]
        assert len(narrower) >= len(scales["minmax"]) // 2, (method, narrower)  # clipped ranges, not minmax's


def test_low_precision_refusals_are_one_line(trained_run: Path, capsys) -> None:
    assert main(["export", str(trained_run), "--precision", "int8", "--format", "torchscript"]) == 2
    assert "is for ONNX exports" in capsys.readouterr().err
    assert main(["export", str(trained_run), "--precision", "int8", "--calibration-images", "0"]) == 2
    assert "--calibration-images 0 is out of range (must be >= 1)" in capsys.readouterr().err
    if platform.machine().lower() not in ("aarch64", "arm64"):
        assert main(["export", str(trained_run), "--precision", "bf16"]) == 2
        err = capsys.readouterr().err
        assert "bf16 matrix kernels only on Arm" in err and err.count("\n") == 1


def test_bf16_export_on_arm_sets_the_session_option(trained_run: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert main(["export", str(trained_run), "--precision", "bf16"]) == 0
    side = json.loads((trained_run / "model.bf16.json").read_text())
    assert side["precision"] == "bf16" and side["session_options"] == {"mlas.enable_gemm_fastmath_arm64_bfloat16": "1"}
    assert side["reference"]["file"] == "model.onnx"
