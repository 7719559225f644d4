"""Tests for the data readers, on small files written in the real formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionzoo.data.loading.collate import collate_skip_bad
from visionzoo.data.sources.cifar import load_cifar
from visionzoo.data.sources.folder import ImageFolderDataset, find_classes
from visionzoo.data.sources.idx import FASHION_MNIST_CLASSES, MNIST_CLASSES, load_idx_split, read_idx
from visionzoo.data.sources.table import SOURCES
from visionzoo.data.sources.tensor_dataset import TensorImageDataset
from visionzoo.errors import UserError

DEFAULT_FASHION_MNIST_DIR = SOURCES["fashion_mnist"].default_path

# ---------------------------------------------------------------- IDX

_IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B,
              np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode ``arr`` as IDX: 0, 0, type code, ndim, big-endian uint32 dims, BE payload."""
    be = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    code = _IDX_CODES[be.dtype]
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + be.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_idx_round_trip(tmp_path: Path, gz: bool, dtype: str) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.integers(-100, 100, size=(3, 4, 5)) if dtype != "u1"
           else rng.integers(0, 256, size=(3, 4, 5))).astype(dtype)
    # Name never says .gz: compression must be detected by the magic bytes.
    out = read_idx(write_idx(tmp_path / "x-idx3-ubyte", arr, gz=gz))
    assert out.dtype == np.dtype(dtype)  # native byte order
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0] = 1  # writable


def test_idx_wrong_magic(tmp_path: Path) -> None:
    p = tmp_path / "bad-idx1-ubyte"
    p.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(UserError, match="bad-idx1-ubyte"):
        read_idx(p)


def test_idx_unknown_type_code(tmp_path: Path) -> None:
    p = tmp_path / "code-idx1-ubyte"
    p.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(UserError, match=r"code-idx1-ubyte.*0x07"):
        read_idx(p)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_wrong_count(tmp_path: Path, gz: bool) -> None:
    data = idx_bytes(np.zeros((2, 3), dtype=">i2"))[:-2]  # one int16 short
    p = tmp_path / "short-idx2-ubyte"
    p.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(UserError) as e:
        read_idx(p)
    assert "short-idx2-ubyte" in str(e.value)
    assert "header says 6 items" in str(e.value) and "holds 10 bytes" in str(e.value)


def test_idx_truncated_header_and_damaged_gzip(tmp_path: Path) -> None:
    p = tmp_path / "hdr"
    p.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 5))
    with pytest.raises(UserError, match="hdr"):
        read_idx(p)
    g = tmp_path / "dmg.gz"
    g.write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:-10])
    with pytest.raises(UserError, match="dmg.gz"):
        read_idx(g)
    with pytest.raises(UserError, match="nothere"):
        read_idx(tmp_path / "nothere")


def _mnist_split(folder: Path, prefix: str, n: int, dotted: bool, gz: bool) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    images = np.arange(n * 4 * 3, dtype=np.uint8).reshape(n, 4, 3)
    labels = (np.arange(n) % 10).astype(np.uint8)
    sep = "." if dotted else "-"
    ext = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images{sep}idx3-ubyte{ext}", images, gz)
    write_idx(folder / f"{prefix}-labels{sep}idx1-ubyte{ext}", labels, gz)
    return images, labels


@pytest.mark.parametrize(("sub", "dotted", "gz"), [
    ("", False, True), ("raw", True, False), ("FashionMNIST/raw", False, False),
    ("MNIST/raw", True, True),
])
def test_load_idx_split_layouts(tmp_path: Path, sub: str, dotted: bool, gz: bool) -> None:
    tr_img, tr_lab = _mnist_split(tmp_path / sub, "train", 7, dotted, gz)
    te_img, te_lab = _mnist_split(tmp_path / sub, "t10k", 3, dotted, gz)
    images, labels = load_idx_split(tmp_path, train=True)
    assert images.dtype == np.uint8 and images.shape == (7, 4, 3)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(images, tr_img)
    np.testing.assert_array_equal(labels, tr_lab)
    images, labels = load_idx_split(tmp_path, train=False)
    np.testing.assert_array_equal(images, te_img)
    np.testing.assert_array_equal(labels, te_lab)


def test_load_idx_split_missing_and_mismatched(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        load_idx_split(tmp_path, train=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 2, 2), np.uint8))
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte"):
        load_idx_split(tmp_path, train=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(UserError, match=r"4 images.*5 labels"):
        load_idx_split(tmp_path, train=False)
    with pytest.raises(UserError, match="not found"):
        load_idx_split(tmp_path / "absent", train=True)


def test_class_name_lists() -> None:
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[0] == "T-shirt/top"
    assert FASHION_MNIST_CLASSES[9] == "Ankle boot"
    assert MNIST_CLASSES == [str(i) for i in range(10)]


def test_real_debian_fashion_mnist() -> None:
    if not Path(DEFAULT_FASHION_MNIST_DIR).is_dir():
        pytest.skip(f"{DEFAULT_FASHION_MNIST_DIR} not present (Debian package dataset-fashion-mnist)")
    images, labels = load_idx_split(DEFAULT_FASHION_MNIST_DIR, train=True)
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
    images, labels = load_idx_split(DEFAULT_FASHION_MNIST_DIR, train=False)
    assert images.shape == (10000, 28, 28)
    assert labels.min() == 0 and labels.max() == 9


# ---------------------------------------------------------------- CIFAR

def _cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path: Path, d: dict, as_bytes: bool) -> None:
    def key(k: str) -> str | bytes:
        return k.encode() if as_bytes else k
    obj = {key(k): ([key(x) for x in v] if isinstance(v, list) and v and isinstance(v[0], str) else v)
           for k, v in d.items()}
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


@pytest.mark.parametrize("as_bytes", [True, False])
def test_cifar100(tmp_path: Path, as_bytes: bool) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class{i}" for i in range(100)]
    train_rows, test_rows = _cifar_rows(6, 1), _cifar_rows(2, 2)
    # One pixel with known colour: row 1, pixel (y=2, x=5) = RGB(10, 20, 30).
    for plane, value in enumerate((10, 20, 30)):
        train_rows[1, plane * 1024 + 2 * 32 + 5] = value
    _dump(folder / "meta", {"fine_label_names": names, "coarse_label_names": ["a"] * 20}, as_bytes)
    _dump(folder / "train", {"data": train_rows, "fine_labels": [0, 99, 5, 6, 7, 8],
                             "coarse_labels": [0] * 6}, as_bytes)
    _dump(folder / "test", {"data": test_rows, "fine_labels": [3, 4]}, as_bytes)

    for root in (tmp_path, folder):  # parent or the folder itself
        images, labels, classes = load_cifar(root, train=True, num_classes=100)
        assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
        assert images.flags.c_contiguous
        assert images[1, 2, 5].tolist() == [10, 20, 30]
        assert labels.dtype == np.int64 and labels.tolist() == [0, 99, 5, 6, 7, 8]
        assert classes == names
    images, labels, _ = load_cifar(tmp_path, train=False, num_classes=100)
    assert images.shape == (2, 32, 32, 3) and labels.tolist() == [3, 4]
    np.testing.assert_array_equal(images[0, :, :, 1], test_rows[0, 1024:2048].reshape(32, 32))


@pytest.mark.parametrize("as_bytes", [True, False])
def test_cifar10(tmp_path: Path, as_bytes: bool) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = ["airplane", "automobile", "bird", "cat", "deer",
             "dog", "frog", "horse", "ship", "truck"]
    _dump(folder / "batches.meta", {"label_names": names, "num_vis": 3072}, as_bytes)
    batches = [_cifar_rows(2, i) for i in range(1, 6)]
    batches[4][1, [31 * 32 + 31, 1024 + 31 * 32 + 31, 2048 + 31 * 32 + 31]] = [200, 100, 0]
    for i, rows in enumerate(batches, start=1):
        _dump(folder / f"data_batch_{i}", {"data": rows, "labels": [i, 9 - i],
                                           "batch_label": "batch", "filenames": ["a", "b"]}, as_bytes)
    _dump(folder / "test_batch", {"data": _cifar_rows(3, 9), "labels": [0, 1, 2]}, as_bytes)

    images, labels, classes = load_cifar(tmp_path, train=True, num_classes=10)
    assert images.shape == (10, 32, 32, 3)
    assert images[9, 31, 31].tolist() == [200, 100, 0]  # last batch, 2nd row, bottom-right
    assert labels.tolist() == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
    assert classes == names
    images, labels, _ = load_cifar(folder, train=False, num_classes=10)
    assert images.shape == (3, 32, 32, 3) and labels.tolist() == [0, 1, 2]


def test_cifar_errors(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _dump(folder / "meta", {"fine_label_names": [str(i) for i in range(100)]}, True)
    _dump(folder / "train", {"data": _cifar_rows(2, 0), "coarse_labels": [0, 1]}, True)
    with pytest.raises(UserError) as e:
        load_cifar(tmp_path, train=True, num_classes=100)
    assert "train" in str(e.value) and "'fine_labels'" in str(e.value)

    _dump(folder / "train", {"data": np.zeros((2, 100), np.uint8), "fine_labels": [0, 1]}, False)
    with pytest.raises(UserError, match="3072"):
        load_cifar(tmp_path, train=True, num_classes=100)

    (folder / "test").write_bytes(b"this is not a pickle")
    with pytest.raises(UserError, match=r"cifar-100-python[/\\]test"):
        load_cifar(tmp_path, train=False, num_classes=100)

    # CIFAR-10 asked for in a folder with only CIFAR-100.
    with pytest.raises(UserError, match="batches.meta"):
        load_cifar(tmp_path, train=True, num_classes=10)
    # Meta present, a training batch missing.
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    _dump(c10 / "batches.meta", {"label_names": [str(i) for i in range(10)]}, False)
    with pytest.raises(UserError, match="data_batch_1"):
        load_cifar(tmp_path, train=True, num_classes=10)


class _CreatesFile:
    """Unpickling this calls open(path, "w"): what a crafted file would do to run code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cifar_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _dump(folder / "batches.meta", {"label_names": [str(i) for i in range(10)]}, True)
    victim = tmp_path / "pwned"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _cifar_rows(2, 0), b"labels": [0, 1], b"x": _CreatesFile(victim)}, f, protocol=2)
    with pytest.raises(UserError) as e:
        load_cifar(tmp_path, train=True, num_classes=10)
    assert not victim.exists()
    msg = str(e.value)
    assert "data_batch_1" in msg and "refusing to load io.open" in msg and "\n" not in msg


def test_cifar_python2_numpy_module_names_load(tmp_path: Path) -> None:
    """The distributed files were pickled by Python 2 with NumPy 1 (numpy.core.multiarray)."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rows = _cifar_rows(3, 5)
    _dump(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]}, True)
    blob = pickle.dumps({b"data": rows, b"fine_labels": [1, 2, 3]}, protocol=2)
    blob = blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray" in blob
    (folder / "test").write_bytes(blob)
    images, labels, _ = load_cifar(tmp_path, train=False, num_classes=100)
    assert labels.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(images[2, :, :, 0], rows[2, :1024].reshape(32, 32))


# ---------------------------------------------------------------- TensorImageDataset

def test_tensor_image_dataset() -> None:
    grey = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    ds = TensorImageDataset(grey, np.array([1, 0]), ["a", "b"])
    img, label = ds[0]
    assert img.shape == (1, 3, 4) and img.dtype == torch.uint8 and label == 1
    assert isinstance(label, int) and len(ds) == 2 and list(ds.targets) == [1, 0]

    rgb = np.zeros((2, 3, 4, 3), dtype=np.uint8)
    rgb[1, 2, 3] = [7, 8, 9]
    ro = np.frombuffer(rgb.tobytes(), dtype=np.uint8).reshape(rgb.shape)  # read-only input
    ds = TensorImageDataset(ro, [0, 1], ["a", "b"], transform=lambda t: t.float() / 255)
    assert ds.images.is_contiguous() and ds.images.shape == (2, 3, 3, 4)
    img, label = ds[1]
    assert img.dtype == torch.float32 and label == 1
    assert (img[:, 2, 3] * 255).round().tolist() == [7, 8, 9]


# ---------------------------------------------------------------- ImageFolder

def _save(path: Path, img: Image.Image, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


@pytest.fixture()
def messy_folder(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    _save(root / "cat" / "a.jpg", red)
    _save(root / "cat" / "b.png", red)
    _save(root / "cat" / "C.JPEG", red, "JPEG")
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    _save(root / "cat" / ".hidden.png", red)
    _save(root / "cat" / "notes.txt.bak", red, "PNG")  # wrong extension: ignored
    # A loop: cat/sub/loop -> cat/sub. Its image must be listed exactly once.
    _save(root / "cat" / "sub" / "deep.png", red)
    os.symlink(root / "cat" / "sub", root / "cat" / "sub" / "loop")
    (root / "empty").mkdir(parents=True)  # class with no images keeps index 1
    (root / ".git").mkdir()  # hidden folder is not a class
    dog = root / "dog"
    _save(dog / "cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)))
    _save(dog / "grey16.png", Image.fromarray(np.array([[0, 32768, 65535, 257]], dtype=np.uint16)))
    _save(dog / "rgba.png", Image.new("RGBA", (4, 4), (200, 100, 50, 128)))
    _save(dog / "p.gif", Image.new("P", (4, 4), 0))
    full = root / "dog" / "full.jpg"
    _save(full, Image.effect_noise((64, 64), 50).convert("RGB"))
    (dog / "truncated.jpg").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    (dog / "zero.png").write_bytes(b"")
    (dog / "text.jpg").write_text("not an image\n")
    return root


def _by_name(ds: ImageFolderDataset) -> dict[str, int]:
    return {os.path.basename(p): i for i, (p, _) in enumerate(ds.samples)}


def test_image_folder_scan(messy_folder: Path) -> None:
    assert find_classes(messy_folder) == ["cat", "dog", "empty"]
    ds = ImageFolderDataset(messy_folder)
    assert ds.classes == ["cat", "dog", "empty"]
    assert ds.class_to_idx == {"cat": 0, "dog": 1, "empty": 2}
    assert ds.empty_classes == ["empty"]
    names = sorted(os.path.basename(p) for p, _ in ds.samples)
    assert names == sorted(["a.jpg", "b.png", "C.JPEG", "deep.png", "cmyk.jpg", "grey16.png",
                            "rgba.png", "p.gif", "full.jpg", "truncated.jpg", "zero.png",
                            "text.jpg"])
    assert ds.targets == [t for _, t in ds.samples]
    assert ds.samples == sorted(ds.samples, key=lambda s: (s[1], s[0]))
    assert ImageFolderDataset(messy_folder).samples == ds.samples  # deterministic


def test_image_folder_decoding(messy_folder: Path) -> None:
    ds = ImageFolderDataset(messy_folder)
    idx = _by_name(ds)
    for bad in ("truncated.jpg", "zero.png", "text.jpg"):
        assert ds[idx[bad]] is None, bad
    img, target = ds[idx["C.JPEG"]]
    assert img.mode == "RGB" and target == 0
    img, target = ds[idx["cmyk.jpg"]]
    assert img.mode == "RGB" and target == 1
    r, g, b = img.getpixel((3, 3))
    assert r > 240 and g < 15 and b < 15
    img, _ = ds[idx["grey16.png"]]
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 1]
    img, _ = ds[idx["rgba.png"]]  # composited onto black: about half the colour
    assert img.mode == "RGB"
    assert all(abs(a - e) <= 1 for a, e in zip(img.getpixel((0, 0)), (100, 50, 25), strict=True))
    img, _ = ds[idx["p.gif"]]
    assert img.mode == "RGB"


def test_image_folder_wide_int_modes(tmp_path: Path) -> None:
    # Big-endian 16-bit and 32-bit "I" images saved as TIFF.
    root = tmp_path / "r"
    big = Image.frombytes("I;16B", (2, 1), b"\xff\xff\x80\x00")
    _save(root / "a" / "be.tif", big)
    _save(root / "a" / "i32.tif", Image.fromarray(np.array([[0, 65535]], dtype=np.int32)))
    _save(root / "a" / "i32wide.tif", Image.fromarray(np.array([[-(2**31), 2**31 - 1]], dtype=np.int32)))
    ds = ImageFolderDataset(root)
    values = {os.path.basename(p): [ds[i][0].getpixel((x, 0))[0] for x in range(2)]
              for i, (p, _) in enumerate(ds.samples)}
    assert values["be.tif"] == [255, 128]
    assert values["i32.tif"] == [0, 255]
    assert values["i32wide.tif"] == [0, 255]


def test_collate_skip_bad(messy_folder: Path) -> None:
    ds = ImageFolderDataset(messy_folder, transform=lambda im: _to_tensor(im.resize((8, 8))))
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds), collate_fn=collate_skip_bad)
    images, targets, dropped = next(iter(loader))
    assert dropped == 3
    assert images.shape == (len(ds) - 3, 3, 8, 8) and images.dtype == torch.uint8
    assert targets.dtype == torch.int64 and len(targets) == len(ds) - 3

    images, targets, dropped = collate_skip_bad([None, None])
    assert images.shape == (0,) and targets.shape == (0,) and dropped == 2


def test_image_folder_val_classes(messy_folder: Path, tmp_path: Path) -> None:
    train = ImageFolderDataset(messy_folder)
    val_root = tmp_path / "val"
    _save(val_root / "dog" / "x.png", Image.new("RGB", (4, 4)))
    val = ImageFolderDataset(val_root, classes=train.classes)
    assert val.classes == train.classes and val.targets == [1]  # dog keeps index 1
    assert val.empty_classes == ["cat", "empty"]

    _save(val_root / "wolf" / "y.png", Image.new("RGB", (4, 4)))
    with pytest.raises(UserError, match=r"class 'wolf' in .*val is not among the 3 training classes"):
        ImageFolderDataset(val_root, classes=train.classes)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing"):
        find_classes(tmp_path / "missing")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(UserError, match="file.txt"):
        ImageFolderDataset(f)
    (tmp_path / "noclasses").mkdir()
    with pytest.raises(UserError, match="noclasses"):
        ImageFolderDataset(tmp_path / "noclasses")
    (tmp_path / "noimages" / "a").mkdir(parents=True)
    (tmp_path / "noimages" / "a" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="noimages"):
        ImageFolderDataset(tmp_path / "noimages")
