"""What a run records is what it built: the class count of the data, not the recipe's default."""

from __future__ import annotations

import json

import yaml
from safetensors import safe_open

from conftest import TINY_FOLDER_RECIPE
from visionzoo.cli import main


def test_a_three_class_fine_tune_records_three_classes(imagefolder_dir, tmp_path, capsys):
    data = tmp_path / "three"
    for split in ("train", "val"):
        for k in range(3):  # imagefolder_dir has 4 classes: take 3
            (data / split).mkdir(parents=True, exist_ok=True)
            (data / split / f"class_{k}").symlink_to(imagefolder_dir / split / f"class_{k}")
    recipe = tmp_path / "tiny_folder.yaml"
    recipe.write_text(TINY_FOLDER_RECIPE)
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--data", str(data), "--output", str(run), "--workers", "0"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["num_classes"] == 3
    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["visionzoo"])
        linear = [f.get_tensor(k).shape for k in f.keys() if f.get_tensor(k).ndim == 2]
    assert [tuple(s)[0] for s in linear] == [3]  # the classifier: 3 outputs
    assert meta["config"]["data"]["num_classes"] == 3 and meta["model"]["num_classes"] == 3
    assert main(["export", str(run)]) == 0
    sidecar = json.loads((run / "model.json").read_text())
    assert len(sidecar["classes"]) == 3 and "1000" not in json.dumps(sidecar)
