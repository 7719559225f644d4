"""benchmarks/cpu.py end to end on the demo model at toy sizes: every row (training steps of
visionzoo and of a timm train.py-style step, PyTorch and ONNX Runtime inference) is measured,
with a fraction of a measured matmul peak, and written as JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
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
        # The demo's small CNN: 4x4 stride-2 stem 1->32 at 14x14, 3x3 32->32 at 14x14, 3x3 32->64 at
        # 7x7, a linear layer over the 7x7x64 map (2 FLOPs per multiply-add).
        forward = 2 * (16 * 32 * 196 + 9 * 32 * 32 * 196 + 9 * 32 * 64 * 49 + 3136 * 10)
        assert r["flops_per_img"] == pytest.approx(forward * (3 if r["kind"] == "train" else 1))
        assert f"| {r['row']} |" in table
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "2"])


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_int8_accuracy_writes_a_cifar100_folder_the_recipe_reads(fmnist_dir: Path, tmp_path: Path) -> None:
    from visionzoo.data.sources.cifar import load_cifar
    from visionzoo.data.sources.idx import load_idx_split

    bench = _load("int8_accuracy")
    folder = bench.write_cifar100(str(fmnist_dir), tmp_path, 64, 32, seed=3)
    images, labels, classes = load_cifar(folder.parent, train=True, num_classes=100)
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.uint8 and classes[:2] == ["T-shirt/top", "Trouser"]
    assert (images[..., 0] == images[..., 2]).all() and images[:, :2].max() == 0 and images[:, :, -2:].max() == 0
    grey, grey_labels = load_idx_split(fmnist_dir, train=True)
    pick = np.random.default_rng(3).permutation(len(grey_labels))[:64]
    assert (images[:, 2:30, 2:30, 1] == grey[pick]).all() and (np.asarray(labels) == grey_labels[pick]).all()
    test_images, _, _ = load_cifar(folder.parent, train=False, num_classes=100)
    assert len(test_images) == 32


def test_int8_accuracy_reports_both_models_on_the_same_images(fmnist_dir: Path, tmp_path: Path, capsys) -> None:
    bench = _load("int8_accuracy")
    assert bench.main(["--recipe", "fashion_mnist", "--fmnist", str(fmnist_dir), "--epochs", "1",
                       "--calibration-images", "32", "--out", str(tmp_path),
                       "data.batch_size=32", "train.amp=none"]) == 0
    row = json.loads((tmp_path / "int8_accuracy.json").read_text())
    assert row["test_images"] == 200 and 0 <= row["int8_acc1"] <= 100 and row["calibration_images"] == 32
    assert row["loss_pt"] == pytest.approx(row["int8_acc1"] - row["fp32_acc1"])
    assert row["int8_ms_per_image"] > 0 and row["fp32_ms_per_image"] > 0 and row["agreement"] >= 0.9
    line = f"| fashion_mnist | 1 | percentile, 32 images | 200 | {row['fp32_acc1']:.2f} | {row['int8_acc1']:.2f} |"
    assert line in capsys.readouterr().out
