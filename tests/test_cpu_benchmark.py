"""benchmarks/cpu.py end to end on the demo model at toy sizes: every row (training steps of
visionzoo and of a timm train.py-style step, PyTorch and ONNX Runtime inference) is measured,
with a fraction of a measured matmul peak, and written as JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("timm")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu.py"


def test_cpu_benchmark_measures_every_row(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("cpu_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "cpu.json"
    assert bench.main(["--recipes", "fashion_mnist", "--batch", "8", "--steps", "1", "--repeats", "3",
                       "--no-compile", "--matmul", "64", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    names = [r["row"] for r in rows]
    assert names == ["visionzoo step fp32 eager", "timm train.py step fp32 eager", "visionzoo step bf16 eager",
                     "timm train.py step bf16 eager", "PyTorch eager fp32", "PyTorch eager bf16",
                     "ONNX Runtime fp32", "ONNX Runtime int8 (QDQ)"]
    for r in rows:
        assert len(r["runs_img_s"]) == 3 and r["img_s"] > 0 and r["img_per_cpu_s"] > 0, r["row"]
        assert r["fraction_of_peak"] > 0 and r["peak"] in ("fp32", "bf16", "int8")
        assert r["flops_per_img"] == pytest.approx(11.065088e6 * (3 if r["kind"] == "train" else 1))
        assert f"| {r['row']} |" in table
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "2"])
