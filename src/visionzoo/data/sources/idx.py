"""Reader for the IDX format used by MNIST and Fashion-MNIST.

IDX layout (all integers big-endian): two zero bytes, one type-code byte, one
byte giving the number of dimensions, then one uint32 per dimension, then the
payload in row-major order.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from visionzoo.data.sources.splits import Splits, existing_dir
from visionzoo.data.sources.tensor_dataset import TensorImageDataset
from visionzoo.errors import UserError

if TYPE_CHECKING:
    from visionzoo.config import DataConfig

__all__ = [
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "fashion_mnist_splits",
    "load_idx_split",
    "mnist_splits",
    "read_idx",
]

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES: list[str] = [str(d) for d in range(10)]

# IDX type code -> element dtype. Multi-byte types are big-endian on disk.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

# Folders below the root where the common download tools leave the raw files
# (torchvision puts them in <root>/<Name>/raw).
_SEARCH_SUBDIRS = (".", "raw", "FashionMNIST/raw", "MNIST/raw")


def _read_bytes(path: Path) -> bytes:
    """Return the file's content, gunzipped when it starts with the gzip magic."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"IDX file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"expected an IDX file but found a folder: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read IDX file {path}: {e.strerror or e}") from None
    # Detect compression by content, not by name: files are often renamed
    # (or gunzipped in place while keeping the .gz suffix).
    if head != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"IDX file {path} is a damaged gzip file: {e}") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or gzipped) into a native-byte-order numpy array.

    Raises UserError if the header is malformed or the payload size does not
    match the dimensions in the header.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise UserError(
            f"{path} is not an IDX file: it must start with two zero bytes "
            f"(got {data[:4].hex(' ') or 'an empty file'})"
        )
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise UserError(
            f"{path}: unknown IDX type code 0x{type_code:02X} "
            f"(expected one of {', '.join(f'0x{c:02X}' for c in _IDX_DTYPES)})"
        )
    if ndim == 0:
        raise UserError(f"{path}: IDX header says the array has 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise UserError(
            f"{path}: IDX header announces {ndim} dimensions but the file ends "
            f"after {len(data)} bytes"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _IDX_DTYPES[type_code]
    count = math.prod(dims)
    payload = len(data) - header_len
    if payload != count * dtype.itemsize:
        raise UserError(
            f"{path}: IDX header says {count} items ({'x'.join(map(str, dims))}, "
            f"{dtype.itemsize} byte(s) each) but file holds {payload} bytes"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header_len)
    # Copy into native byte order: callers get a writable array that torch can
    # wrap without a byte swap or a read-only warning.
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def _candidate_names(stem: str) -> list[str]:
    """File names one IDX file may have: 'train-images-idx3-ubyte' and the
    'train-images.idx3-ubyte' spelling of the original MNIST site, each with or
    without '.gz'."""
    prefix, _, suffix = stem.rpartition("-idx")
    dotted = f"{prefix}.idx{suffix}"
    return [stem, stem + ".gz", dotted, dotted + ".gz"]


def _find_in(folder: Path, names: list[str]) -> Path | None:
    for name in names:
        p = folder / name
        if p.is_file():
            return p
    return None


def load_idx_split(root: str | Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of MNIST / Fashion-MNIST from IDX files under ``root``.

    Looks in root, root/raw, root/FashionMNIST/raw and root/MNIST/raw.
    Returns (images uint8 [N, H, W], labels int64 [N]).
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"MNIST-style data folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"MNIST-style data path is not a folder: {root}")
    split = "train" if train else "t10k"
    image_names = _candidate_names(f"{split}-images-idx3-ubyte")
    label_names = _candidate_names(f"{split}-labels-idx1-ubyte")

    images_path = labels_path = None
    partial: list[str] = []
    for sub in _SEARCH_SUBDIRS:
        folder = root / sub
        if not folder.is_dir():
            continue
        img_p, lab_p = _find_in(folder, image_names), _find_in(folder, label_names)
        if img_p and lab_p:
            images_path, labels_path = img_p, lab_p
            break
        # Remember half-present splits so the error can say what is missing.
        if img_p or lab_p:
            partial.append(f"{folder} has {(img_p or lab_p).name} but not its "
                           f"{'labels' if img_p else 'images'} file")
    if images_path is None or labels_path is None:
        where = ", ".join(str(root / s) if s != "." else str(root) for s in _SEARCH_SUBDIRS)
        detail = f" ({'; '.join(partial)})" if partial else ""
        raise UserError(
            f"no {'train' if train else 'test'} split found under {root}: looked for "
            f"{' / '.join(image_names)} and {' / '.join(label_names)} in {where}{detail}"
        )

    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UserError(
            f"{images_path}: expected uint8 images of shape [N, H, W], "
            f"got {images.dtype} with shape {list(images.shape)}"
        )
    if labels.ndim != 1:
        raise UserError(
            f"{labels_path}: expected a 1-D label array, got shape {list(labels.shape)}"
        )
    if len(images) != len(labels):
        raise UserError(
            f"{images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels"
        )
    return images, labels.astype(np.int64)


def _splits(d: DataConfig, train: bool, classes: list[str]) -> Splits:
    if d.path is None:
        raise UserError(f"{d.name} needs --data: the folder holding the IDX files")
    existing_dir(d.path, d.name)
    val_ds = TensorImageDataset(*load_idx_split(d.path, False), classes)
    train_ds = TensorImageDataset(*load_idx_split(d.path, True), classes) if train else None
    return Splits(train_ds, val_ds, list(classes))


def fashion_mnist_splits(d: DataConfig, train: bool) -> Splits:
    """The reader of data.name=fashion_mnist: the four IDX files (train-*, t10k-*), gzipped or not."""
    return _splits(d, train, FASHION_MNIST_CLASSES)


def mnist_splits(d: DataConfig, train: bool) -> Splits:
    """The reader of data.name=mnist: the four IDX files (train-*, t10k-*), gzipped or not."""
    return _splits(d, train, MNIST_CLASSES)
