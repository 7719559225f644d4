"""Hostile parquet files: an image column whose ``bytes`` are not binary is refused in one line
before training; a row's ``path`` is read only inside the data folder; a payload that is not
bytes is a counted bad sample, never a file name to open."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from conftest import TINY_FOLDER_RECIPE
from visionzoo.cli import main
from visionzoo.data.loading.stream_loader import StreamLoader
from visionzoo.data.sources.hfds import ParquetReader
from visionzoo.data.sources.shards import Shard, ShardStream


def _png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _write(folder, image_column: pa.Array, labels: list[int]) -> None:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        shard = folder / "data" / f"{split}-00000-of-00001.parquet"
        pq.write_table(pa.table({"image": image_column, "label": labels}), shard)


def _train(tmp_path, data) -> tuple[int, dict | None]:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_FOLDER_RECIPE)
    run = tmp_path / "run"
    code = main(["train", str(recipe), "--data", str(data), "data.name=hfds", "--output", str(run), "log.progress=off"])
    return code, json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else None


@pytest.mark.parametrize("bytes_type", [pa.string(), pa.int64()], ids=["string", "int64"])
def test_image_bytes_that_are_not_binary_are_refused_before_training(tmp_path, capsys, bytes_type):
    # Before: a string was opened as a local file name (any file the process can read became a
    # training image), an int64 killed the loader with AttributeError.
    secret = tmp_path / "outside.png"
    secret.write_bytes(_png())
    value = str(secret) if pa.types.is_string(bytes_type) else 7
    images = pa.array([{"bytes": value, "path": None}] * 4,
                      type=pa.struct([("bytes", bytes_type), ("path", pa.string())]))
    _write(tmp_path / "ds", images, [0, 1, 0, 1])
    code, res = _train(tmp_path, tmp_path / "ds")
    assert code == 2 and res is None
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "{bytes: binary, path: string}" in err and "-00000-of-00001.parquet" in err


def test_a_row_path_is_read_only_inside_the_data_folder(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png(1))
    (tmp_path / "ds" / "data").mkdir(parents=True)
    (tmp_path / "ds" / "data" / "inside.png").write_bytes(_png(2))
    images = pa.array([{"bytes": None, "path": str(outside)}, {"bytes": None, "path": "../../outside.png"},
                       {"bytes": None, "path": "inside.png"}, {"bytes": _png(3), "path": "x.png"}],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    shard = tmp_path / "ds" / "data" / "train.parquet"
    pq.write_table(pa.table({"image": images, "label": [0, 1, 0, 1]}), shard)
    rows = list(ParquetReader().read(Shard(str(shard), 4), 0))
    assert [r[1] is not None for r in rows] == [False, False, True, True]  # before: the first was read
    assert rows[0][3] == f"no image bytes (path {outside} is not a file in the data folder)"
    assert rows[2][1] == _png(2)


def test_a_payload_that_is_not_bytes_is_a_counted_bad_sample(tmp_path):
    class Reader:  # a reader handing over a file name where the bytes belong
        remote = False

        def read(self, shard, start):
            yield from iter([("k0", str(tmp_path / "x.png"), 0, None), ("k1", _png(), 1, None)][start:])

    (tmp_path / "x.png").write_bytes(_png())
    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32)])
    stream = ShardStream([Shard("s", 2)], Reader(), ["a", "b"], to_tensor, retries=0)
    good = bad = 0
    for images, _, n_bad in StreamLoader(stream, 2, 0, False):
        good, bad = good + len(images), bad + n_bad
    assert (good, bad) == (1, 1)
