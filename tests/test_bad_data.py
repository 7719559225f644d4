"""The bad-input catalogue: every row ends in a counted skip (training completes) or in one
clear error line with exit code 2 — never a crash mid-epoch and never a silently wrong label.

Each case starts from a small ImageFolder (train: 4 + 3 good images, val: 2 + 2), adds one bad
thing, and runs the real CLI (`visionzoo train`) on it."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_FOLDER_RECIPE
from visionzoo.cli import main

FAST = ["--workers", "0"]


def _rgb(seed: int, size: tuple[int, int] = (20, 16)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _folder(root: Path) -> Path:
    """train/{a: 4, b: 3} and val/{a: 2, b: 2} good PNGs of 20x16 pixels."""
    for split, counts in (("train", {"a": 4, "b": 3}), ("val", {"a": 2, "b": 2})):
        for cls, n in counts.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                _rgb(100 * len(split) + 10 * ord(cls) + i).save(root / split / cls / f"{i}.png")
    return root


def _jpeg_bytes(img: Image.Image) -> bytes:
    from io import BytesIO
    buf = BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# --------------------------------------------------------------------- the cases, one per row
def truncated_jpeg(root: Path) -> None:
    data = _jpeg_bytes(_rgb(7, (64, 48)))
    (root / "train/b/cut.jpg").write_bytes(data[: len(data) // 2])


def zero_byte_file(root: Path) -> None:
    (root / "train/b/empty.jpg").write_bytes(b"")


def non_image_with_image_extension(root: Path) -> None:
    (root / "train/b/readme.png").write_text("this is not a PNG\n")


def cmyk_jpeg(root: Path) -> None:
    Image.new("CMYK", (20, 16), (0, 255, 255, 0)).save(root / "train/b/cmyk.jpg")


def greyscale_png(root: Path) -> None:
    Image.new("L", (20, 16), 90).save(root / "train/b/grey.png")


def png_16_bit(root: Path) -> None:
    Image.fromarray(np.full((16, 20), 40000, dtype=np.uint16)).save(root / "train/b/deep.png")


def png_with_alpha(root: Path) -> None:
    Image.new("RGBA", (20, 16), (200, 100, 50, 128)).save(root / "train/b/alpha.png")


def upper_case_jpeg_extension(root: Path) -> None:
    (root / "train/b/UPPER.JPEG").write_bytes(_jpeg_bytes(_rgb(8)))


def hidden_files(root: Path) -> None:
    (root / "train/b/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (root / "train/b/._0.png").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork


def empty_class_folder(root: Path) -> None:
    (root / "train/c").mkdir()


def val_class_not_in_train(root: Path) -> None:
    (root / "val/zebra").mkdir()
    _rgb(9).save(root / "val/zebra/0.png")


def symlink_loop(root: Path) -> None:
    os.symlink(root / "train/b", root / "train/b/loop")


def _cifar(root: Path, drop_key: bytes) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir()
    for split, n in (("train", 8), ("test", 4)):
        batch = {b"data": np.zeros((n, 3072), np.uint8), b"fine_labels": [0] * n, b"coarse_labels": [0] * n}
        del batch[drop_key]
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"x"] * 100}, protocol=2))
    return folder


def _idx(root: Path, magic: int = 0x0803, count: int | None = None) -> Path:
    folder = root / "fmnist"
    folder.mkdir()
    for prefix, n in (("train", 8), ("t10k", 4)):
        images = np.zeros((n, 28, 28), np.uint8)
        header = struct.pack(">I", magic) + struct.pack(">3I", count if count is not None else n, 28, 28)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(header + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x0801, n) + bytes(n))
    return folder


# name → (make the bad thing, expectation), or (recipe text, its replacement, expectation). An expectation is either
#   dict(train=N, bad=K[, classes=C, says=TEXT]): training completes, N training images listed, K skipped
#   or a regular expression the single error line must match (exit code 2).
CASES: dict[str, tuple] = {
    "truncated JPEG": (truncated_jpeg, dict(train=8, bad=1)),
    "zero-byte file": (zero_byte_file, dict(train=8, bad=1)),
    "non-image with an image extension": (non_image_with_image_extension, dict(train=8, bad=1)),
    "CMYK JPEG": (cmyk_jpeg, dict(train=8, bad=0)),
    "greyscale PNG": (greyscale_png, dict(train=8, bad=0)),
    "16-bit PNG": (png_16_bit, dict(train=8, bad=0)),
    "PNG with alpha": (png_with_alpha, dict(train=8, bad=0)),
    "upper-case .JPEG": (upper_case_jpeg_extension, dict(train=8, bad=0)),
    "hidden files (.DS_Store)": (hidden_files, dict(train=7, bad=0)),
    "empty class folder": (empty_class_folder,
                           dict(train=7, bad=0, classes=3, says="1 class folder(s) with no training images: c")),
    "class in val but not in train": (val_class_not_in_train,
                                      r"class 'zebra' in .*val is not among the 2 training classes"),
    "symlink loop": (symlink_loop, dict(train=7, bad=0)),
    "CIFAR pickle with a missing key": (lambda root: _cifar(root, b"fine_labels"), r"fine_labels"),
    "IDX file with a wrong magic number": (lambda root: _idx(root, magic=0x1F8B0803),
                                           r"t10k-images-idx3-ubyte.gz is not an IDX file"),
    "IDX count that does not match its size": (
        lambda root: _idx(root, count=9),
        r"t10k-images-idx3-ubyte.gz: IDX header says 7056 items .* but file holds 3136 bytes"),
    "recipe YAML with an unknown key": ("lr: 0.05", "lrr: 0.05", r"optim\.lrr.*did you mean 'optim\.lr'"),
    "recipe YAML with a wrong type": ("epochs: 1", "epochs: many", r"train\.epochs"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, tmp_path: Path, capsys) -> None:
    *make, expect = CASES[case]
    recipe = tmp_path / "tiny_folder.yaml"
    recipe.write_text(TINY_FOLDER_RECIPE)
    data, extra = _folder(tmp_path / "data"), []
    if isinstance(make[0], str):  # a broken recipe: one value of the good one replaced
        recipe.write_text(TINY_FOLDER_RECIPE.replace(make[0], make[1]))
    else:
        make = make[0]
        made = make(data)
        if isinstance(made, Path):  # another format's folder
            data = made
            extra = ["data.name=cifar100" if "cifar" in made.name else "data.name=fashion_mnist"]
    code = main(["train", str(recipe), "--data", str(data), "--output", str(tmp_path / "run"), *FAST, *extra])
    out, err = capsys.readouterr()

    if isinstance(expect, str):
        assert code == 2, out + err
        line = err.strip()
        assert line.startswith("visionzoo: error:") and "\n" not in line and "Traceback" not in err
        assert re.search(expect, line, re.IGNORECASE), line
        return
    assert code == 0, err
    header = re.search(r"(\d+) train / (\d+) val images, (\d+) classes", out)
    assert header, out
    assert int(header[1]) == expect["train"] and int(header[2]) == 4 and int(header[3]) == expect.get("classes", 2)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["bad_images"] == expect["bad"]
    # Batch 4, last partial batch dropped: the bad image only shrinks its own batch.
    assert results["steps"] == expect["train"] // 4
    assert (tmp_path / "run" / "model.safetensors").is_file()
    if expect["bad"]:
        assert f"warning: {expect['bad']} unreadable image(s) were skipped" in out
    if "says" in expect:
        assert expect["says"] in out
