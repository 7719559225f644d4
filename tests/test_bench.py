"""visionzoo bench through the real CLI: model-only and end-to-end figures, their ratio, the
settings and step counts in the JSON file, and one-line user errors."""

from __future__ import annotations

import json

import pytest
import torch

from visionzoo.cli import main
from visionzoo.commands.bench import RepeatBatch, synthetic_source
from visionzoo.config import load_config

CPU = ["--device", "cpu", "--workers", "0"]


def _check(result: dict, settings: list[str], steps: int, warmup: int, batch: int) -> None:
    assert result["settings"] == settings
    assert [r["setting"] for r in result["results"]] == settings
    assert result["steps"] == steps and result["warmup_steps"] == warmup and result["devices"] == 1
    for r in result["results"]:
        assert r["model_only_img_s"] > 0 and r["end_to_end_img_s"] > 0
        assert r["ratio"] == pytest.approx(r["end_to_end_img_s"] / r["model_only_img_s"])
        for phase in ("model_only", "end_to_end"):
            assert r[phase]["steps"] == steps and r[phase]["images"] == steps * batch
            assert r[phase]["img_s"] == pytest.approx(r[phase]["images"] / r[phase]["seconds"])
        assert r["first_step_s"] > 0 and r["compile_s"] is None and r["compile"] is False
        assert r["final_loss"] == r["final_loss"]  # not NaN


def test_bench_fashion_mnist_on_idx_files(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "fm.json"
    args = ["bench", "fashion_mnist", "--data", str(fmnist_dir), "--steps", "3", "--output", str(out), *CPU,
            "train.perf_warmup_steps=1", "data.batch_size=32"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    _check(result, ["fp32", "bf16"], steps=3, warmup=1, batch=32)  # CPU autocast has bf16
    assert result["loader"] == "device-resident" and result["data"] == str(fmnist_dir)
    assert result["input_shape"] == [32, 1, 28, 28] and result["config"]["recipe"] == "fashion_mnist"
    text = capsys.readouterr().out
    assert "| setting | model-only img/s | end-to-end img/s | ratio | first step s |" in text
    assert "| fp32 |" in text and "| bf16 |" in text


def test_bench_scaled_imagenet_recipe_on_synthetic_data(tmp_path):
    # The decode-free source: 500x375 images through the recipe's RandomResizedCrop + flip in
    # a DataLoader worker, as ImageFolder files would go (~8 s: AlexNet's 54M-weight classifier).
    out = tmp_path / "folder"
    args = ["bench", "alexnet_imagenet", "--data", "synthetic", "--steps", "2", "--output", str(out),
            "--precision", "fp32", "--device", "cpu", "--workers", "1", "train.perf_warmup_steps=0",
            "data.image_size=64", "data.batch_size=8", "data.num_classes=10"]
    assert main(args) == 0
    result = json.loads((out / "bench.json").read_text())
    _check(result, ["fp32"], steps=2, warmup=0, batch=8)
    assert result["loader"].startswith("DataLoader") and result["data"].startswith("synthetic")
    assert result["input_shape"] == [8, 3, 64, 64]


def test_synthetic_source_matches_the_recipe_data():
    cifar = load_config("resnet50_cifar100").data
    splits = synthetic_source(cifar, 16)
    assert len(splits.classes) == 100 and tuple(splits.train.images.shape) == (16, 3, 32, 32)
    image, label = splits.train[0]  # the recipe's train transform: a 32 px uint8 crop (normalised per batch)
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 32, 32) and 0 <= label < 100
    folder = load_config("nfnet_f0_imagenet", ["data.num_classes=5"]).data
    image, label = synthetic_source(folder, 4).train[3]
    assert tuple(image.shape) == (3, 192, 192) and 0 <= label < 5  # RandomResizedCrop 192 + RandAugment


def test_repeat_batch_yields_the_same_tensors():
    x, y = torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64)
    batches = list(RepeatBatch(x, y, 3))
    assert len(batches) == 3 and all(b[0] is x and b[1] is y and b[2] == 0 for b in batches)


@pytest.mark.parametrize("args, message", [
    (["bench", "no_such_recipe"], "unknown recipe 'no_such_recipe'"),
    (["bench", "fashion_mnist", "--data", "/no/such/folder"], "data path does not exist"),
    (["bench", "fashion_mnist", "--precision", "fp8"], "--precision"),
    (["bench", "alexnet_imagenet", "--data", "synthetic", "data.decode=device"], "data.decode=device needs JPEG files"),
])
def test_bench_user_errors_are_one_line(args, message, capsys):
    assert main([*args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("visionzoo: error: ") and message in err and err.count("\n") == 1
