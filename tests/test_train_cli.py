"""The real CLI end to end on generated files: every supervised recipe scaled down
(train → checkpoint → eval), the demo learning, --perf, and one-line user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import write_idx
from visionzoo.cli import main
from visionzoo.run_folder import read_metrics

FAST = ["--epochs", "1", "--workers", "0", "--device", "cpu", "--amp", "none", "train.log_every=1"]
IMAGENET_SMALL = ["data.batch_size=4", "train.max_steps_per_epoch=2"]

SCALED = {
    "alexnet_imagenet": ("imagefolder_dir",
                         IMAGENET_SMALL + ["data.image_size=64", "data.test_resize=72", "data.test_size=64"]),
    "densenet201_imagenet": ("imagefolder_dir",
                             IMAGENET_SMALL + ["data.image_size=32", "data.test_resize=36", "data.test_size=32"]),
    "nfnet_f0_imagenet": ("imagefolder_dir",
                          IMAGENET_SMALL + ["data.image_size=64", "data.test_resize=72", "data.test_size=64"]),
    "resnet50_cifar100": ("cifar100_dir", ["data.batch_size=8", "train.max_steps_per_epoch=2"]),
    "fashion_mnist": ("fmnist_dir", ["data.batch_size=32", "train.max_steps_per_epoch=3"]),
}


@pytest.mark.parametrize("recipe", list(SCALED))
def test_scaled_recipe_trains_checkpoints_and_evaluates(recipe, request, tmp_path, capsys):
    fixture, overrides = SCALED[recipe]
    data = request.getfixturevalue(fixture)
    run = tmp_path / "run"
    assert main(["train", recipe, "--data", str(data), "--output", str(run), *FAST, *overrides]) == 0
    out = capsys.readouterr().out
    assert "| recipe | Acc@1 | FPS | devices | BN group | epochs | precision | torch |" in out

    results = json.loads((run / "results.json").read_text())
    for key in ("ActualFPS", "TrainingTime", "TrainAccuracy", "ActualLoss", "E2ETrainingTime"):
        assert results[key] is not None, key
    assert results["recipe"] == recipe and results["devices"] == 1 and results["precision"] == "fp32"
    assert results["epochs"] == 1 and results["mode"] == "full" and results["FPS"] > 0
    assert 0.0 <= results["Acc@1"] <= results["Acc@5"] <= 100.0

    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(steps) == results["steps"] and len(epochs) == 1
    assert epochs[0]["acc1"] == results["Acc@1"]
    assert all(r["loss"] == r["loss"] for r in steps)  # finite, not NaN

    with safe_open(str(run / "model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["visionzoo"])
    assert meta["config"]["recipe"] == recipe and meta["epoch"] == 1
    assert (run / "best.safetensors").is_file() and (run / "config.yaml").is_file()
    assert [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")] != []

    # Evaluating the saved weights on the same data reproduces the run's own numbers.
    assert main(["eval", str(run), "--data", str(data), "--workers", "0", "--device", "cpu", "--amp", "none"]) == 0
    line = capsys.readouterr().out
    k = min(5, len(meta["classes"]))  # top-5 is named top-k with fewer classes
    assert f"Acc@1 {results['Acc@1']:.2f}%" in line and f"Acc@{k} {results['Acc@5']:.2f}%" in line


def test_demo_recipe_learns(tmp_path):
    # Real Fashion-MNIST (Debian's dataset-fashion-mnist, which `make data` and CI install): the
    # demo's classifier reads the layout of centred clothes, which the suite's generated stripe
    # textures do not have. 4000 training images, 3 epochs of batch 64: 83.4% on an AVX2 CPU.
    from visionzoo.data.sources.idx import load_idx_split
    from visionzoo.data.sources.table import data_source

    source = Path(data_source("fashion_mnist").default_path)
    if not source.is_dir():
        pytest.skip(f"{source} is missing: make data")
    data = tmp_path / "fm"
    data.mkdir()
    for train, n, prefix in ((True, 4000, "train"), (False, 1000, "t10k")):
        images, labels = load_idx_split(source, train)
        write_idx(data / f"{prefix}-images-idx3-ubyte.gz", images[:n])
        write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", labels[:n])
    run = tmp_path / "demo"
    args = ["train", "fashion_mnist", "--data", str(data), "--output", str(run), "--epochs", "3",
            "--device", "cpu", "data.batch_size=64"]
    assert main(args) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["Acc@1"] >= 75.0  # chance is 10%
    epochs = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]


def test_perf_run_reports_fps(fmnist_dir, tmp_path, capsys):
    run = tmp_path / "perf"
    args = ["train", "fashion_mnist", "--data", "synthetic", "--perf", "--steps", "5", "--output", str(run),
            "--device", "cpu", "train.perf_warmup_steps=2", "data.batch_size=16", "data.num_classes=10"]
    assert main(args) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["mode"] == "perf" and results["steps"] == 7 and results["Acc@1"] is None
    assert results["FPS"] > 0 and results["TrainingTime"] == pytest.approx(1000 * 16 / results["FPS"])
    assert results["first_step_s"] > 0 and results["loader"] == "device-resident" and results["cpu_fallbacks"] is None
    assert "Final Performance images/sec" in capsys.readouterr().out


def test_compiled_perf_run_says_how_long_compiling_took(tmp_path, capsys):
    run = tmp_path / "compiled"
    args = ["train", "fashion_mnist", "--data", "synthetic", "--perf", "--steps", "2", "--output", str(run),
            "--device", "cpu", "train.perf_warmup_steps=1", "data.batch_size=8", "data.num_classes=10",
            "train.compile=true", "model.kwargs.width=4"]
    assert main(args) == 0
    results = json.loads((run / "results.json").read_text())
    out = capsys.readouterr().out
    assert results["FPS"] > 0 and results["first_step_s"] > 0
    assert f"torch.compile: the first step took {results['first_step_s']:.1f} s" in out


@pytest.mark.parametrize("argv, words", [
    (["train", "nope_recipe"], "unknown recipe"),
    (["train", "fashion_mnist", "--data", "/does/not/exist"], "does not exist"),
    (["train", "fashion_mnist", "optim.lrr=1"], "did you mean 'optim.lr'"),
    (["train", "fashion_mnist", "--epochs", "1", "data.batch_size=oops"], "data.batch_size"),
    (["train", "alexnet_imagenet"], "--data"),
    (["eval", "/no/such/run"], "checkpoint not found"),
])
def test_user_errors_are_one_line(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("visionzoo: error:") and words in err and "\n" not in err


def test_imagefolder_without_val(tmp_path, capsys):
    (tmp_path / "train" / "a").mkdir(parents=True)
    assert main(["train", "alexnet_imagenet", "--data", str(tmp_path)]) == 2
    assert "no val/ folder" in capsys.readouterr().err


def test_recipes_listing_and_show(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in SCALED:
        assert name in out
    assert main(["recipes", "--show", "resnet50_cifar100", "optim.lr=0.3", "--epochs", "7"]) == 0
    shown = capsys.readouterr().out
    assert "lr: 0.3" in shown and "epochs: 7" in shown and "milestones:" in shown


@pytest.mark.parametrize("cmd", ["train", "eval", "recipes"])
def test_help_has_examples(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "examples:" in capsys.readouterr().out
