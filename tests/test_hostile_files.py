"""Hostile or damaged data files (CIFAR pickles, shard manifests) give one line naming the file,
and a manifest's shard names never make visionzoo read outside the data folder."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from visionzoo.cli import main


def _cifar_with(root: Path, train_bytes: bytes) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(train_bytes)
    return folder


class _CodecTrick:
    """Pickles as _codecs.encode('a', 'nonexistent'): an allowed builder with a bad argument."""

    def __reduce__(self):
        import _codecs

        return (_codecs.encode, ("a", "nonexistent"))


HOSTILE_CIFAR = {
    "bad_codec": (lambda: pickle.dumps({b"data": _CodecTrick(), b"labels": [0]}, protocol=2), "cannot unpickle"),
    "object_data": (lambda: pickle.dumps({b"data": np.array([[object()] * 3072], dtype=object), b"labels": [0]},
                                         protocol=2), None),
    "string_labels": (lambda: pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [["x"]]}, protocol=2),
                      "not a list of integer labels"),
}


@pytest.mark.parametrize("kind", list(HOSTILE_CIFAR))
def test_hostile_cifar_files_give_one_line_naming_the_file(tmp_path, capsys, kind):
    make, words = HOSTILE_CIFAR[kind]
    try:
        content = make()
    except (pickle.PicklingError, TypeError):
        pytest.skip("this Python cannot pickle the object")
    folder = _cifar_with(tmp_path, content)
    code = main(["train", "resnet50_cifar100", "--data", str(folder), "data.name=cifar10", "--device", "cpu",
                 "--epochs", "1", "train.max_steps_per_epoch=1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "data_batch_1" in err or "test_batch" in err, err
    if words:
        assert words in err, err


def test_object_data_is_named(tmp_path):
    from visionzoo.data.sources.cifar import _read_batch
    from visionzoo.errors import UserError

    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": np.array([["x"] * 3072], dtype=object), b"labels": [0]}, protocol=2))
    with pytest.raises(UserError, match=r"data_batch_1: key 'data' holds object values"):
        _read_batch(p, "labels")


@pytest.mark.parametrize("entry, words", [
    ({"name": "../secret.tar", "bytes": 1, "sha256": "x", "samples": 1}, "points outside the folder"),
    ({"name": "/etc/passwd", "bytes": 1, "sha256": "x", "samples": 1}, "points outside the folder"),
    ({"name": "train-000000.tar", "sha256": "x", "samples": 1}, "has no int 'bytes'"),
    ("train-000000.tar", "has no str 'name'"),
])
def test_hostile_manifests_never_read_outside_the_folder(wds_dir, tmp_path, capsys, monkeypatch, entry, words):
    shards = tmp_path / "shards"
    shutil.copytree(wds_dir, shards)
    secret = tmp_path / "secret.tar"
    secret.write_bytes(b"not yours")
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0] = entry
    (shards / "manifest.json").write_text(json.dumps(manifest))
    opened = []
    real_open = open

    def spy(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    assert main(["data", "verify", str(shards)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(shards / "manifest.json") in err and words in err, err
    assert not any("secret" in f or f == "/etc/passwd" for f in opened)


def test_a_cifar10_folder_given_to_a_cifar100_recipe_names_the_fix(tmp_path, capsys):
    cifar10_batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    folder = _cifar_with(tmp_path, pickle.dumps(cifar10_batch, protocol=2))
    assert main(["train", "resnet50_cifar100", "--data", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no CIFAR-100 data under" in err and "set data.name=cifar10" in err and err.count("\n") == 1


def test_a_refused_connection_is_not_reported_as_a_missing_file(tmp_path, capsys):
    pytest.importorskip("aiohttp")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    code = main(["train", "fashion_mnist", "--data", f"http://127.0.0.1:{port}/shards/", "data.name=webdataset",
                 "--device", "cpu", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "FileNotFoundError" not in err and "connect" in err.lower(), err
