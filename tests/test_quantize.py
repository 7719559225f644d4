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
from visionzoo.commands import quantize  # noqa: E402
from visionzoo.commands.export import sha256_file  # noqa: E402
from visionzoo.commands.quantize import INT8_TARGETS, calibration_sets, detect_int8_target, run_batches  # noqa: E402

NO_VNNI = {"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bw": True}  # Skylake-X: AVX512, no VNNI


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, fmnist_dir: Path) -> Path:
    run = tmp_path_factory.mktemp("q") / "run"
    # Global pooling for the test's stripe textures (tests/test_export.py says why).
    assert main(["train", "fashion_mnist", "--data", str(fmnist_dir), "--epochs", "1", "--batch-size", "32",
                 "--device", "cpu", "--amp", "none", "--output", str(run), "model.kwargs={width: 16}"]) == 0
    return run


def test_int8_export_agrees_with_fp32_and_records_its_calibration(trained_run: Path, fmnist_dir: Path, capsys) -> None:
    run = trained_run
    assert main(["export", str(run), "--precision", "int8", "--calibration-images", "96"]) == 0
    out = capsys.readouterr().out
    here = detect_int8_target()  # the default target: this machine's CPU
    bits = 7 if here == "x86" else 8
    said = f"int8 model (static QDQ, {bits}-bit weights for {here} CPUs, percentile calibration on 96 training images"
    assert said in out
    assert f"wrote the int8 model {run / 'model.int8.onnx'} and its fp32 reference {run / 'model.onnx'}" in out
    fp32, int8 = run / "model.onnx", run / "model.int8.onnx"
    side = json.loads((run / "model.int8.json").read_text())
    assert json.loads((run / "model.json").read_text())["precision"] == "fp32"
    assert side["precision"] == "int8" and side["file"] == "model.int8.onnx" and side["sha256"] == sha256_file(int8)
    q = side["quantization"]
    assert q["format"] == "QDQ" and q["calibration"] == "percentile" and q["calibration_images"] == 96
    assert q["calibration_options"] == {"num_bins": 2048, "percentile": 99.999}
    assert q["calibration_split"] == "train" and q["calibration_transform"] == "eval"
    assert q["target"] == q["exported_on"] == here and q["reduce_range"] == (here == "x86")
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
    from visionzoo.commands.quantize import quantize_int8
    from visionzoo.config import from_dict

    fp32 = trained_run / "model.onnx"
    if not fp32.is_file():
        assert main(["export", str(trained_run)]) == 0
    sidecar = json.loads((trained_run / "model.json").read_text())
    d = from_dict({"recipe": "fashion_mnist", "data": sidecar["data"]}).data
    calib, _ = calibration_sets(d, 64, str(fmnist_dir))
    scales = {}
    for method in ("minmax", "entropy", "percentile"):
        info = quantize_int8(fp32, tmp_path / f"{method}.onnx", calib, method)
        assert info["calibration"] == method
        scales[method] = _activation_scales(tmp_path / f"{method}.onnx")
    assert scales["minmax"].keys() == scales["entropy"].keys() == scales["percentile"].keys()
    # Bounds measured on both kinds of CPU (the 11 tensors' ratios to minmax, AVX512-VNNI / AVX2
    # under qemu): entropy 0.69-0.93 on 7 tensors on both; percentile 0.977-0.990 on the 6 large
    # post-ReLU tensors (~200k values: the 99.999th percentile drops their top few) and >= 0.995
    # on the small ones. The trained model differs with the ISA's round-off; the clipping does not.
    ratio = {m: {k: v / scales["minmax"][k] for k, v in scales[m].items()} for m in ("entropy", "percentile")}
    assert all(r <= 1 + 1e-6 for m in ratio for r in ratio[m].values()), ratio  # never wider than the data
    assert sum(r < 0.95 for r in ratio["entropy"].values()) >= 5, ratio["entropy"]  # KL thresholds, not minmax's
    assert sum(r < 0.995 for r in ratio["percentile"].values()) >= 5, ratio["percentile"]


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


def test_int8_target_follows_the_cpu() -> None:
    # Which settings each CPU gets: VNNI in any of its forms (cpuinfo's names and /proc/cpuinfo's)
    # accumulates u8×s8 products in int32; without it (AVX2, AVX512 without VNNI) 7-bit weights.
    assert detect_int8_target({"architecture": "x86_64", "avx2": True}) == "x86"
    assert detect_int8_target(NO_VNNI) == "x86"
    assert detect_int8_target({**NO_VNNI, "avx512_vnni": True}) == "x86-vnni"
    assert detect_int8_target({"architecture": "x86_64", "avx2": True, "avx_vnni": True}) == "x86-vnni"  # Alder Lake
    assert detect_int8_target({"architecture": "x86_64", "avx512vnni": True}) == "x86-vnni"  # /proc/cpuinfo's name
    assert detect_int8_target({**NO_VNNI, "amx_int8": True}) == "x86-vnni"
    assert detect_int8_target({"architecture": "aarch64", "neon": True, "dot": True}) == "arm"
    assert detect_int8_target({"architecture": "arm64"}) == "arm"
    settings = {name: (t.activations, t.weights, t.reduce_range) for name, t in INT8_TARGETS.items()}
    assert settings == {"x86": ("uint8", "int8", True), "x86-vnni": ("uint8", "int8", False),
                        "arm": ("uint8", "int8", False)}
    assert quantize.resolve_int8_target("x86") is INT8_TARGETS["x86"]
    assert quantize.resolve_int8_target("auto") is INT8_TARGETS[detect_int8_target()]
    assert detect_int8_target() in INT8_TARGETS  # this machine is one of them


def _conv_weights(path: Path) -> list[np.ndarray]:
    graph = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    dq = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    return [inits[dq[n.input[1]].input[0]] for n in graph.node if n.op_type == "Conv"]


def test_x86_target_has_7_bit_weights_and_vnni_8_bit(trained_run: Path, fmnist_dir: Path, tmp_path: Path) -> None:
    from visionzoo.commands.quantize import quantize_int8
    from visionzoo.config import from_dict

    fp32 = trained_run / "model.onnx"
    if not fp32.is_file():
        assert main(["export", str(trained_run)]) == 0
    sidecar = json.loads((trained_run / "model.json").read_text())
    d = from_dict({"recipe": "fashion_mnist", "data": sidecar["data"]}).data
    calib, _ = calibration_sets(d, 32, str(fmnist_dir))
    for name, limit in (("x86", 64), ("x86-vnni", 127)):
        info = quantize_int8(fp32, tmp_path / f"{name}.onnx", calib, "minmax", INT8_TARGETS[name])
        assert info["target"] == name and info["reduce_range"] == (name == "x86")
        weights = _conv_weights(tmp_path / f"{name}.onnx")
        assert weights and all(w.dtype == np.int8 for w in weights)
        # symmetric per channel: each channel's largest weight maps to the range's end
        ends = [int(np.abs(w.astype(np.int32)).reshape(len(w), -1).max(1).max()) for w in weights]
        assert all(abs(e - limit) <= 1 for e in ends), (name, ends)


def test_infer_warns_once_when_a_vnni_model_runs_without_vnni(trained_run: Path, fmnist_dir: Path, tmp_path: Path,
                                                                monkeypatch, capsys) -> None:
    # --output X.int8.onnx names the int8 file; the fp32 reference goes to X.onnx.
    out = tmp_path / "m.int8.onnx"
    assert main(["export", str(trained_run), "--precision", "int8", "--int8-target", "x86-vnni",
                 "--calibration-images", "32", "--output", str(out)]) == 0
    assert out.is_file() and (tmp_path / "m.onnx").is_file() and not (tmp_path / "m.int8.int8.onnx").exists()
    side = json.loads((tmp_path / "m.int8.json").read_text())
    assert side["quantization"]["target"] == "x86-vnni" and side["reference"]["file"] == "m.onnx"
    capsys.readouterr()
    warning = ("m.int8.onnx: this int8 model has 8-bit weights (--int8-target x86-vnni), for CPUs with VNNI or Arm; "
               "this CPU has no VNNI, so its u8×s8 products can saturate and its accuracy drop: export it again "
               "with --int8-target x86")
    monkeypatch.setattr(quantize, "cpu_capabilities", lambda: NO_VNNI)
    assert main(["infer", str(out), "--data", str(fmnist_dir)]) == 0
    err = capsys.readouterr().err
    assert err.count(warning) == 1 and err.count("\n") == 1
    monkeypatch.setattr(quantize, "cpu_capabilities", lambda: {**NO_VNNI, "avx512_vnni": True})
    assert main(["infer", str(out), "--data", str(fmnist_dir)]) == 0
    assert "VNNI" not in capsys.readouterr().err
    # A model for any x86 CPU runs without the warning everywhere.
    assert main(["export", str(trained_run), "--precision", "int8", "--int8-target", "x86",
                 "--calibration-images", "32", "--output", str(tmp_path / "any.onnx")]) == 0
    monkeypatch.setattr(quantize, "cpu_capabilities", lambda: NO_VNNI)
    capsys.readouterr()
    assert main(["infer", str(tmp_path / "any.int8.onnx"), "--data", str(fmnist_dir)]) == 0
    assert "VNNI" not in capsys.readouterr().err
    assert main(["export", str(trained_run), "--int8-target", "x86"]) == 2
    assert "--int8-target is for --precision int8" in capsys.readouterr().err


def test_agreement_refuses_only_where_this_cpu_computes_as_the_target(monkeypatch, tmp_path: Path, capsys) -> None:
    # Half the images disagree: a refusal, unless this CPU saturates where the target does not
    # (8-bit weights checked on x86 without VNNI): then a lower bound, recorded and said.
    calls = iter([np.eye(4)[[0, 1, 2, 3]], np.eye(4)[[0, 1, 0, 0]]] * 3)
    monkeypatch.setattr(quantize, "run_batches", lambda session, x: next(calls))
    monkeypatch.setattr(quantize, "_session", lambda path: None)
    check = np.zeros((4, 1, 2, 2), np.float32)
    monkeypatch.setattr(quantize, "cpu_capabilities", lambda: NO_VNNI)
    with pytest.raises(quantize.UserError, match="agrees with the fp32 model's on only 50.0% of 4"):
        quantize.int8_agreement("a", "b", check, INT8_TARGETS["x86"])
    result = quantize.int8_agreement("a", "b", check, INT8_TARGETS["x86-vnni"])
    assert result["top1_agreement"] == 0.5 and result["checked_on"] == "x86" and "lower" not in result["note"]
    assert "at least this" in result["note"]
    assert "top-1 agreement 50.0% here is a lower bound for its target" in capsys.readouterr().out
    monkeypatch.setattr(quantize, "cpu_capabilities", lambda: {**NO_VNNI, "avx512_vnni": True})
    with pytest.raises(quantize.UserError, match="50.0%"):
        quantize.int8_agreement("a", "b", check, INT8_TARGETS["x86-vnni"])
