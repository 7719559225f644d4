"""Bad shards and bad samples: each case gives one line naming the shard or sample, bad samples
are skipped and counted, a bad shard is skipped and named and the epoch goes on, a URL that
does not answer times out; and the ImageFolder file-list cache (`visionzoo data scan`)."""

from __future__ import annotations

import io
import json
import shutil
import socket
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from torchvision.transforms import v2

from conftest import TINY_FOLDER_RECIPE, write_jpeg_tree
from visionzoo.cli import main
from visionzoo.data.loading.stream_loader import StreamLoader
from visionzoo.data.sources.folder import ImageFolderDataset
from visionzoo.data.sources.scan_cache import cache_file
from visionzoo.data.sources.shards import Shard, ShardStream
from visionzoo.data.sources.webdataset import TarReader

TO_TENSOR = v2.Compose([v2.ToImage(), v2.ToDtype(__import__("torch").float32)])


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _pass(shards: list[Shard], classes: int = 4, timeout: float = 60.0, remote: bool = False,
          retries: int = 0) -> tuple[int, int, list[str]]:
    """(good, bad) samples of one evaluation pass, and the failed shards."""
    reader = TarReader(timeout)
    reader.remote = remote
    stream = ShardStream(shards, reader, [str(i) for i in range(classes)], TO_TENSOR, retries=retries)
    loader = StreamLoader(stream, 4, 0, False)
    good = bad = 0
    for images, _, n_bad in loader:
        good, bad = good + len(images), bad + n_bad
    return good, bad, loader.bad_shards


def _train(tmp_path: Path, data: str, *extra: str) -> tuple[int, dict | None]:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_FOLDER_RECIPE)
    run = tmp_path / "run"
    code = main(["train", str(recipe), "--data", data, "--output", str(run), "log.progress=off", *extra])
    res = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else None
    return code, res


def test_samples_without_label_or_out_of_range_are_named_and_counted(tmp_path, capsys):
    from webdataset import TarWriter

    path = tmp_path / "odd-000000.tar"
    with open(path, "wb") as f, TarWriter(f, encoder=False) as w:
        w.write({"__key__": "ok", "jpg": _jpeg(0), "cls": b"1"})
        w.write({"__key__": "nolabel", "jpg": _jpeg(1)})
        w.write({"__key__": "big", "jpg": _jpeg(2), "cls": b"9"})
        w.write({"__key__": "text", "png": _jpeg(3), "cls": b"cat"})
        w.write({"__key__": "json", "webp": _jpeg(4), "json": b'{"label": 2}'})
        w.write({"__key__": "noimage", "cls": b"0"})
        w.write({"__key__": "broken", "jpg": b"\xff\xd8\xff not a jpeg", "cls": b"0"})
    good, bad, failed = _pass([Shard(str(path), 7)])
    assert (good, bad, failed) == (2, 5, [])  # .png/.webp names hold JPEG bytes: Pillow reads the content
    err = capsys.readouterr().err
    for key, why in (("nolabel", "no label"), ("big", "label 9 is outside 0..3"), ("text", "not an integer"),
                     ("noimage", "no image"), ("broken", "the image cannot be decoded")):
        line = next(ln for ln in err.splitlines() if f":{key}:" in ln)
        assert why in line and str(path) in line


def test_truncated_and_corrupt_shards_are_named_and_the_epoch_goes_on(wds_dir, tmp_path, capsys):
    shards = [Shard(str(p), 5) for p in sorted(wds_dir.glob("train-*.tar"))[:3]]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(shards[0].name).read_bytes()[:2500])  # inside the second sample
    corrupt = tmp_path / "corrupt.tar"
    data = bytearray(Path(shards[1].name).read_bytes())
    with tarfile.open(shards[1].name) as tf:
        header = tf.getmembers()[4].offset  # the first member of the third sample
    data[header:header + 512] = b"\x07" * 512  # a broken header in the middle: tarfile stops reading there
    corrupt.write_bytes(bytes(data))
    gone = tmp_path / "gone.tar"
    good, bad, failed = _pass([Shard(str(cut), 5), Shard(str(corrupt), 5), Shard(str(gone), 5), shards[2]])
    assert good + bad == 20 and failed == [str(cut), str(corrupt), str(gone)]
    # A broken header ends the archive cleanly after the samples before it; a cut-off member raises,
    # and the sample being grouped at that moment (the one before the cut) goes with it.
    assert good == 5 + max(sum(1 for _ in _readable(cut)) - 1, 0) + sum(1 for _ in _readable(corrupt))
    err = capsys.readouterr().err.splitlines()
    assert any(ln.endswith(f"shard {cut}: ReadError: unexpected end of data; its 5 remaining sample(s) are skipped "
                           "and counted") for ln in err)
    assert any(str(corrupt) in ln and "expected 5" in ln for ln in err)
    assert any(str(gone) in ln and "FileNotFoundError" in ln for ln in err)


def _readable(path: Path):
    """The complete image members tarfile itself gets out of a damaged archive."""
    try:
        with tarfile.open(path, "r|") as tf:
            for m in tf:
                if m.name.endswith(".jpg"):
                    tf.extractfile(m).read()
                    yield m.name
    except tarfile.ReadError:
        return


def test_a_truncated_shard_while_training_is_counted_in_results(wds_dir, tmp_path, capsys):
    data = tmp_path / "shards"
    shutil.copytree(wds_dir, data)
    victim = data / "train-000003.tar"
    victim.write_bytes(victim.read_bytes()[:3000])
    lost = 5 - sum(1 for _ in _readable(victim))
    code, res = _train(tmp_path, str(data), "data.name=webdataset", "--workers", "0")
    assert code == 0 and res["bad_images"] == lost and res["bad_shards"] == [str(victim)]
    assert res["steps"] == 12  # the epoch went on: every batch was taken
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "train-000003.tar" in ln]
    assert lines and "skipped and counted" in lines[0]


def test_a_url_that_does_not_answer_times_out(tmp_path, capsys):
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.perf_counter()
        good, bad, failed = _pass([Shard(f"{url}/train-000000.tar", 3)], timeout=0.5, remote=True, retries=1)
        assert (good, bad, failed) == (0, 3, [f"{url}/train-000000.tar"])
        assert "Timeout" in capsys.readouterr().err
        # As --data: the manifest cannot be read, one line, exit code 2.
        code, _ = _train(tmp_path, url, "data.name=webdataset", "data.io_timeout=0.5")
        assert time.perf_counter() - t0 < 60
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{url}/manifest.json" in err and "Timeout" in err


def test_parquet_without_the_expected_columns_is_one_line(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    for split in ("train", "validation"):
        table = pa.table({"img": [_jpeg(0)], "target": [0]})
        pq.write_table(table, tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    code, _ = _train(tmp_path, str(tmp_path), "data.name=hfds")
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "validation-00000-of-00001.parquet" in err
    assert "'image'" in err and "img (binary)" in err


def test_a_pattern_matching_nothing_is_one_line(tmp_path, capsys):
    for data, words in ((f"{tmp_path}/train-{{000..003}}.tar", "4 of 4 shard(s) missing"),
                        (f"{tmp_path}/train-*.tar", "matches no file"),
                        (str(tmp_path), "no train-*.tar")):
        code, _ = _train(tmp_path, data, "data.name=webdataset")
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


# ------------------------------------------------------------------------- ImageFolder scans
def test_the_file_list_is_cached_and_follows_changes(tmp_path):
    root = write_jpeg_tree(tmp_path / "tree", 8, 4)
    train = root / "train"
    first = ImageFolderDataset(train)
    assert first.scan_state == "scanned" and cache_file(train).is_file()
    again = ImageFolderDataset(train)
    assert again.scan_state == "cached" and again.samples == first.samples
    shutil.copy(train / "c0" / "000.jpg", train / "c1" / "new.jpg")  # a new file changes its folder's mtime
    added = ImageFolderDataset(train)
    assert added.scan_state == "scanned" and (str(train / "c1" / "new.jpg"), 1) in added.samples
    assert len(added) == len(first) + 1
    (train / "c0" / "000.jpg").unlink()
    assert len(ImageFolderDataset(train)) == len(first)
    nested = train / "c2" / "sub"
    nested.mkdir()
    shutil.copy(train / "c1" / "new.jpg", nested / "deep.jpg")
    assert (str(nested / "deep.jpg"), 2) in ImageFolderDataset(train).samples
    assert ImageFolderDataset(train, scan_cache=False).scan_state == "scanned (cache off)"


def test_data_scan_reports_classes_unreadable_files_and_the_cache(tmp_path, capsys):
    root = write_jpeg_tree(tmp_path / "tree", 8, 4)
    (root / "train" / "c3" / "cut.jpg").write_bytes(_jpeg(5)[:60])
    assert main(["data", "scan", str(root)]) == 0
    out = capsys.readouterr().out
    assert "train: 9 images in 4 classes (2-3 per class); 1 unreadable; file list scanned" in out
    assert f"unreadable: {root / 'train' / 'c3' / 'cut.jpg'}" in out
    assert main(["data", "scan", str(root / "val"), "--no-check"]) == 0
    said = "val: 4 images in 4 classes (1-1 per class); not decoded (--no-check); file list cached"
    assert said in capsys.readouterr().out
