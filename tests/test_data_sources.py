"""The table of data sources (data/sources/table.py) is the one place that knows them: a new source
is one reader function plus one registration and then trains and packs through the real CLI; every
source is named in the data.name error and in docs/data.md; the table's module stays light."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from visionzoo.cli import main
from visionzoo.config import load_config, recipe_names
from visionzoo.data.sources import table
from visionzoo.data.sources.splits import Splits
from visionzoo.data.sources.table import SOURCES, DataSource, data_source, register
from visionzoo.data.sources.tensor_dataset import TensorImageDataset
from visionzoo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["dark", "light"]


def read_npy(d, train: bool) -> Splits:
    """The toy reader: DATA/{train,val}_{x,y}.npy, uint8 images [N, 28, 28] and int labels."""
    root = Path(d.path)

    def split(name: str) -> TensorImageDataset:
        return TensorImageDataset(np.load(root / f"{name}_x.npy"), np.load(root / f"{name}_y.npy"), CLASSES)

    return Splits(split("train") if train else None, split("val"), list(CLASSES))


@pytest.fixture
def npy_source(tmp_path, monkeypatch) -> Path:
    """A folder of .npy arrays (40 train, 12 val images of 28x28, dark or light by class) and the
    source that reads it registered as data.name=npy (for this test only)."""
    g = np.random.default_rng(0)
    for name, n in (("train", 40), ("val", 12)):
        labels = np.arange(n) % 2
        images = (labels[:, None, None] * 160 + g.integers(0, 64, (n, 28, 28))).astype(np.uint8)
        np.save(tmp_path / f"{name}_x.npy", images)
        np.save(tmp_path / f"{name}_y.npy", labels)
    monkeypatch.setattr(table, "SOURCES", dict(SOURCES))  # the registration below ends with the test
    register(DataSource("npy", read_npy, in_memory=True, stored_size=(28, 28)))
    return tmp_path


def test_a_new_source_is_a_reader_and_one_registration(npy_source, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "fashion_mnist", "--data", str(npy_source), "data.name=npy", "--output", str(run),
                 "--epochs", "1", "--device", "cpu", "--amp", "none", "data.batch_size=16",
                 "train.max_steps_per_epoch=1", "log.progress=off"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 1 and results["epochs"] == 1
    assert results["loader"] == "device-resident"  # in_memory=True: the table's word, not a name check
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["visionzoo"])
    assert meta["classes"] == CLASSES and meta["config"]["data"]["name"] == "npy"
    assert meta["config"]["data"]["num_classes"] == 2 and meta["model"]["num_classes"] == 2

    # `data pack --source` takes it too (its choices come from the table), arrays in, PNG shards out.
    out = tmp_path / "shards"
    assert main(["data", "pack", str(npy_source), str(out), "--source", "npy"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "npy" and manifest["classes"] == CLASSES
    assert manifest["splits"]["train"]["per_class"] == [20, 20] and manifest["splits"]["val"]["samples"] == 12


def test_every_source_is_in_the_data_name_error_and_in_the_docs():
    with pytest.raises(UserError) as err:
        data_source("fashon_mnist")
    assert str(err.value) == ("data.name='fashon_mnist' is not one of imagefolder, cifar10, cifar100, fashion_mnist, "
                              "mnist, synthetic, webdataset, hfds; did you mean 'fashion_mnist'?")
    page = (ROOT / "docs" / "data.md").read_text()
    for name in SOURCES:
        assert name in str(err.value), name
        assert f"`{name}`" in page, f"docs/data.md does not list data.name={name}"
    assert {load_config(r).data.name for r in recipe_names()} <= set(SOURCES)


def test_the_cli_names_a_wrong_data_name_in_one_line(capsys):
    assert main(["train", "fashion_mnist", "data.name=cifar", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == ("visionzoo: error: data.name='cifar' is not one of imagefolder, cifar10, cifar100, fashion_mnist, "
                   "mnist, synthetic, webdataset, hfds; did you mean 'cifar10'?\n")


def test_the_table_module_imports_no_reader_and_no_torch():
    # The CLI checks data.name with it before torch loads (tests/test_cli_startup.py times that).
    probe = ("import sys, visionzoo.data.sources.table as t; t.data_source('cifar10'); "
             "heavy = [m for m in sys.modules if m in ('torch', 'numpy') or m.startswith('visionzoo.data.sources.')]; "
             "print(sorted(set(heavy) - {'visionzoo.data.sources.table'}))")
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
