"""Unreadable images are named, not only counted: `data pack` decodes each image once and lists
the ones it left out in manifest.json (--no-check copies files unread)."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import write_jpeg_tree
from visionzoo.cli import main


@pytest.mark.parametrize("check", [True, False])
def test_data_pack_leaves_out_and_lists_undecodable_files(tmp_path, capsys, check):
    pytest.importorskip("webdataset")
    src = write_jpeg_tree(tmp_path / "src", n_train=8, n_val=4)
    (src / "train" / "c0" / "fake.jpg").write_text("this is a text file\n")
    good = (src / "train" / "c1" / "001.jpg").read_bytes()
    (src / "train" / "c1" / "cut.jpg").write_bytes(good[: len(good) // 2])
    out = tmp_path / "shards"
    assert main(["data", "pack", str(src), str(out), *([] if check else ["--no-check"])]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = manifest["splits"]["train"]["skipped"]
    if check:
        assert sorted(s.split(":")[0] for s in skipped) == ["train/c0/fake.jpg", "train/c1/cut.jpg"]
        assert manifest["splits"]["train"]["samples"] == 8
        assert "2 left out (see manifest.json)" in capsys.readouterr().out
    else:
        assert skipped == [] and manifest["splits"]["train"]["samples"] == 10


@pytest.mark.parametrize("workers", [0, 2])
def test_training_names_unreadable_images_per_split_once_each(imagefolder_dir, tmp_path, capsys, workers):
    from conftest import TINY_FOLDER_RECIPE

    data = tmp_path / "data"
    shutil.copytree(imagefolder_dir, data)
    (data / "train" / "class_0" / "fake.jpg").write_text("not an image\n")
    (data / "val" / "class_1" / "empty.png").write_bytes(b"")
    recipe = tmp_path / "tiny_folder.yaml"
    recipe.write_text(TINY_FOLDER_RECIPE)
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--data", str(data), "--output", str(run), "--epochs", "2",
                 "--workers", str(workers)]) == 0
    out = capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    # Read in both epochs, counted once: the same count however many epochs ran.
    assert results["bad_images_per_split"] == {"train": 1, "val": 1} and results["bad_images"] == 2
    assert results["bad_image_names"] == {"train": [str(data / "train" / "class_0" / "fake.jpg")],
                                          "val": [str(data / "val" / "class_1" / "empty.png")]}
    assert (f"warning: 2 unreadable image(s) were skipped: train 1 ({data / 'train' / 'class_0' / 'fake.jpg'}); "
            f"val 1 ({data / 'val' / 'class_1' / 'empty.png'})") in out


def test_dino_names_unreadable_images(jpeg_tree, tmp_path, capsys):
    from test_dino import TINY_OVERRIDES

    data = tmp_path / "data"
    shutil.copytree(jpeg_tree, data)
    (data / "train" / "c0" / "fake.jpg").write_text("not an image\n")
    run = tmp_path / "run"
    assert main(["train", "dino_fashion_mnist", "--data", str(data), "--output", str(run), "--device", "cpu",
                 *TINY_OVERRIDES, "data.name=imagefolder", "data.in_chans=3", "data.mean=[128,128,128]",
                 "data.std=[64,64,64]", "train.epochs=1", "data.workers=0",
                 "data.image_size=27", "data.test_size=27", "data.test_resize=27", "dino.knn_k=[5]",
                 "dino.knn_report_k=5"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["bad_images"] == 1 and results["bad_images_per_split"] == {"train": 1, "val": 0}
    assert results["bad_image_names"] == {"train": [str(data / "train" / "c0" / "fake.jpg")], "val": []}
    fake = data / "train" / "c0" / "fake.jpg"
    assert f"warning: 1 unreadable image(s) were skipped: train 1 ({fake})" in capsys.readouterr().out


def test_undecodable_shard_samples_are_named(tmp_path, capsys):
    pytest.importorskip("webdataset")
    from conftest import TINY_FOLDER_RECIPE

    src = write_jpeg_tree(tmp_path / "src", n_train=8, n_val=4)
    (src / "train" / "c0" / "fake.jpg").write_text("this is a text file\n")
    out = tmp_path / "shards"
    assert main(["data", "pack", str(src), str(out), "--no-check"]) == 0
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_FOLDER_RECIPE)
    capsys.readouterr()
    assert main(["train", str(recipe), "--data", str(out), "data.name=webdataset", "--output", str(tmp_path / "run"),
                 "log.progress=off", "data.batch_size=3"]) == 0
    err = capsys.readouterr().err
    assert f"sample {out / 'train-000000.tar'}:" in err, err
    assert "the image cannot be decoded; skipped and counted" in err, err
