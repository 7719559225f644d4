"""Small things a new user meets: the order of `visionzoo runs`, which flags each --help lists,
what `recipes --show` prints for a 28-px recipe."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from visionzoo.cli import build_parser, main
from visionzoo.commands.runs import list_runs


def _run(root: Path, name: str, start: float, touched: float) -> None:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("recipe: fashion_mnist\ntrain: {epochs: 1}\n")
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 1, "time": start}) + "\n")
    os.utime(run, (touched, touched))  # a folder's mtime moves whenever the run adds a file


def test_runs_are_listed_in_start_order(tmp_path):
    _run(tmp_path, "b-first", 1_000_000.0, 3_000_000.0)
    _run(tmp_path, "a-second", 2_000_000.0, 1_000_000.0)
    assert [r["run"] for r in list_runs(tmp_path)][:2] == ["b-first", "a-second"]


@pytest.mark.parametrize("command", ["eval", "knn", "linear"])
def test_eval_commands_do_not_list_training_flags(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    text = sub.format_help()
    assert "--lr" not in text and "--seed" not in text
    assert ("--epochs" in text) == (command == "linear")


@pytest.mark.parametrize("recipe, size", [("dino_fashion_mnist", 27), ("fashion_mnist", 28), ("resnet50_cifar100", 32)])
def test_recipes_show_the_size_they_evaluate_at(recipe, size, capsys):
    assert main(["recipes", "--show", recipe]) == 0
    out = capsys.readouterr().out
    assert f"test_size: {size}\n" in out and "test_resize: 0\n" in out


def test_a_resumed_epoch_counts_on_from_where_it_stopped(capsys):
    from visionzoo.progress import Progress

    progress = Progress(range(50), 100, "epoch 2", "lines", start=50)
    for i, _ in enumerate(progress):
        if i == 0:
            progress.update(loss=1.0)
    assert capsys.readouterr().out.startswith("epoch 2 step 51/100 loss")


def test_dino_knn_says_its_size_and_can_be_capped(fmnist_dir, tmp_path, capsys):
    from test_dino import TINY_OVERRIDES

    run = tmp_path / "run"
    assert main(["train", "dino_fashion_mnist", "--data", str(fmnist_dir), "--output", str(run), "--device", "cpu",
                 *TINY_OVERRIDES, "train.max_steps_per_epoch=2", "dino.knn_max_train=100"]) == 0
    assert "k-NN: features of 100 training and 200 validation images" in capsys.readouterr().out
    assert json.loads((run / "results.json").read_text())["Acc@1"] is not None


def test_bench_refuses_fp64(capsys):
    assert main(["bench", "fashion_mnist", "--data", "synthetic", "train.amp=fp64", "--device", "cpu"]) == 2
    assert "train.amp=fp64 is for numerical checks" in capsys.readouterr().err


def test_recipes_show_counts_the_classes_training_will_use(tmp_path, capsys):
    """`recipes --show R --data DIR` prints the class count of DIR's class folders, not the
    schema's 1000; where it cannot know without reading the data it says why."""
    for split in ("train", "val"):
        for c in ("ant", "bee", "cat", "dog", ".hidden"):
            (tmp_path / "mine" / split / c).mkdir(parents=True)

    def shown(*args: str) -> str:
        assert main(["recipes", "--show", "alexnet_imagenet", *args]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if "num_classes" in line)

    train = tmp_path / "mine" / "train"
    assert shown("--data", str(tmp_path / "mine")) == \
        f"  num_classes: 4  # the class folders of {train}: what training uses"
    assert shown() == ("  num_classes: 1000  # not used: training counts the classes in data.path "
                       "(give --data DIR to count them here)")
    assert shown("--data", str(tmp_path / "nope")) == \
        f"  num_classes: 1000  # not used: the data folder {tmp_path / 'nope'} does not exist"
    assert shown("--data", str(train / "ant")) == \
        f"  num_classes: 1000  # not used: {train / 'ant'} has no train/ or val/ folder of class folders"
    assert shown("--data", "synthetic", "data.num_classes=7") == "  num_classes: 7"
    assert main(["recipes", "--show", "fashion_mnist"]) == 0
    assert "  num_classes: 10  # the classes of fashion_mnist: what training uses\n" in capsys.readouterr().out
