"""Reader for CIFAR-10 / CIFAR-100 in the python-pickle format they are distributed in.

CIFAR-10:  cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
CIFAR-100: cifar-100-python/{train, test, meta}
Each data file is a pickled dict whose 'data' is a uint8 array [N, 3072]: a
row holds the 1024-byte R plane, then G, then B, each plane row-major 32x32.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visionzoo.data.sources.splits import Splits, existing_dir
from visionzoo.data.sources.tensor_dataset import TensorImageDataset
from visionzoo.errors import UserError, first_line

if TYPE_CHECKING:
    from visionzoo.config import DataConfig

__all__ = ["cifar10_splits", "cifar100_splits", "load_cifar"]

_ROW_BYTES = 3 * 32 * 32


@dataclass(frozen=True)
class _Layout:
    """File and key names used by one CIFAR variant."""

    num_classes: int
    folder: str
    train_files: list[str]
    test_file: str
    meta_file: str
    labels_key: str
    names_key: str


_LAYOUTS = {
    10: _Layout(10, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                "test_batch", "batches.meta", "labels", "label_names"),
    100: _Layout(100, "cifar-100-python", ["train"], "test", "meta",
                 "fine_labels", "fine_label_names"),
}


def _find_folder(root: Path, layout: _Layout) -> Path:
    """Accept either the cifar-* folder itself or a folder that contains it."""
    if not root.exists():
        raise UserError(f"CIFAR data folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"CIFAR data path is not a folder: {root}")
    candidates = [root, root / layout.folder]
    # Someone may have renamed the extracted folder (e.g. cifar-10-batches-py-2):
    # any cifar-* child holding the meta file is taken, in sorted order.
    candidates += sorted(p for p in root.iterdir()
                         if p.is_dir() and p.name.lower().startswith("cifar"))
    for folder in candidates:
        if (folder / layout.meta_file).is_file():
            return folder
    other = _LAYOUTS[110 - layout.num_classes]  # the other CIFAR: a likely mix-up, name its data.name
    elsewhere = [root, root / other.folder, *candidates[2:]]
    hint = next((f"; it holds CIFAR-{other.num_classes} ({folder}): set data.name=cifar{other.num_classes}"
                 for folder in elsewhere if (folder / other.meta_file).is_file()), "")
    raise UserError(
        f"no CIFAR-{layout.num_classes} data under {root}: "
        f"looked for {layout.meta_file} in {root} and in {root / layout.folder}{hint}"
    )


def _normalise(obj: Any) -> Any:
    """Decode bytes keys/strings to str, recursing into dicts and lists.

    Pickles written by Python 2 (the official ones) have byte-string keys and
    class names; re-pickled copies from Python 3 may use either kind.
    """
    if isinstance(obj, bytes):
        return obj.decode("latin1")
    if isinstance(obj, dict):
        return {_normalise(k): (_normalise(v) if isinstance(v, (bytes, list)) else v)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_normalise(v) if isinstance(v, bytes) else v for v in obj]
    return obj


# What the distributed CIFAR pickles (and re-pickled copies) reference: NumPy's array and
# dtype reconstruction, and _codecs.encode, which protocol 2 uses for bytes written by Python 3.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data only: dicts, lists, str/bytes, numbers and NumPy
    arrays. Any other global (os.system, builtins.eval, a class's constructor ...) is refused,
    so a crafted file in a shared folder cannot run code as the training user."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: CIFAR files hold data only")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = module.replace("numpy.core", "numpy._core", 1)  # NumPy 2 moved it; no warning
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"CIFAR file missing: {path}")
    try:
        with open(path, "rb") as f:
            # pickle is the data set's own distributed format, read with an unpickler that
            # admits data only. encoding="latin1" is what numpy needs to rebuild arrays
            # pickled by Python 2 (a byte-for-byte mapping).
            obj = _DataUnpickler(f, encoding="latin1").load()
    except OSError as e:
        raise UserError(f"cannot read CIFAR file {path}: {e.strerror or e}") from None
    except Exception as e:  # a damaged or hostile file can make the allowed builders raise anything
        raise UserError(f"cannot unpickle CIFAR file {path}: {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(obj, dict):
        raise UserError(f"CIFAR file {path} holds a {type(obj).__name__}, expected a dict")
    return _normalise(obj)


def _get(d: dict[str, Any], key: str, path: Path) -> Any:
    if key not in d:
        keys = ", ".join(sorted(map(str, d))) or "none"
        raise UserError(f"CIFAR file {path} has no key '{key}' (keys: {keys})")
    return d[key]


def _read_batch(path: Path, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    data = _get(d, "data", path)
    labels = _get(d, labels_key, path)
    if isinstance(data, (bytes, bytearray)):
        data = np.frombuffer(data, dtype=np.uint8)
    try:
        data = np.asarray(data)
    except ValueError as e:
        raise UserError(f"CIFAR file {path}: key 'data' is not an array ({e})") from None
    if data.ndim == 1 and data.size % _ROW_BYTES == 0:
        data = data.reshape(-1, _ROW_BYTES)
    if data.ndim != 2 or data.shape[1] != _ROW_BYTES:
        raise UserError(
            f"CIFAR file {path}: key 'data' has shape {list(data.shape)}, expected "
            f"rows of {_ROW_BYTES} bytes (32x32 pixels x 3 planes)"
        )
    if data.dtype.kind not in "biu":  # objects, strings, floats: not pixels
        raise UserError(f"CIFAR file {path}: key 'data' holds {data.dtype} values, expected uint8 pixels")
    if data.dtype != np.uint8:
        if data.size and (data.min() < 0 or data.max() > 255):
            raise UserError(f"CIFAR file {path}: key 'data' has values outside 0..255")
        data = data.astype(np.uint8)
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"CIFAR file {path}: key '{labels_key}' is not a list of integer labels") from None
    if len(labels) != len(data):
        raise UserError(
            f"CIFAR file {path}: key 'data' has {len(data)} rows but key "
            f"'{labels_key}' has {len(labels)} labels"
        )
    return data, labels


def load_cifar(root: str | Path, train: bool,
               num_classes: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load one split of CIFAR-10 or CIFAR-100 from the python-pickle files.

    ``root`` is the cifar-10-batches-py / cifar-100-python folder or its parent.
    Returns (images uint8 [N, 32, 32, 3] HWC RGB, labels int64 [N], class names).
    """
    if num_classes not in _LAYOUTS:
        raise UserError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    layout = _LAYOUTS[num_classes]
    folder = _find_folder(Path(root), layout)

    meta_path = folder / layout.meta_file
    names = _get(_unpickle(meta_path), layout.names_key, meta_path)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"CIFAR file {meta_path}: key '{layout.names_key}' is not a list of names")
    if len(names) != num_classes:
        raise UserError(
            f"CIFAR file {meta_path}: key '{layout.names_key}' lists {len(names)} "
            f"classes, expected {num_classes}"
        )

    files = layout.train_files if train else [layout.test_file]
    parts = [(folder / name, *_read_batch(folder / name, layout.labels_key)) for name in files]
    for path, _, labels in parts:
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise UserError(
                f"CIFAR file {path}: key '{layout.labels_key}' has labels outside "
                f"0..{num_classes - 1}"
            )
    rows = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    labels = np.concatenate([p[2] for p in parts])
    # [N, 3072] -> [N, 3, 32, 32] (planes) -> [N, 32, 32, 3] (HWC, like PIL/numpy images).
    images = np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels, list(names)


def _splits(d: DataConfig, train: bool, num_classes: int) -> Splits:
    if d.path is None:
        raise UserError(f"{d.name} needs --data: the folder holding cifar-{num_classes}-python* (or its parent)")
    existing_dir(d.path, d.name)
    val_images, val_labels, classes = load_cifar(d.path, False, num_classes)
    train_ds = None
    if train:
        images, labels, _ = load_cifar(d.path, True, num_classes)
        train_ds = TensorImageDataset(images, labels, classes)
    return Splits(train_ds, TensorImageDataset(val_images, val_labels, classes), classes)


def cifar10_splits(d: DataConfig, train: bool) -> Splits:
    """The reader of data.name=cifar10: the python pickles (train: data_batch_1..5, val: test_batch)."""
    return _splits(d, train, 10)


def cifar100_splits(d: DataConfig, train: bool) -> Splits:
    """The reader of data.name=cifar100: the python pickles (train, val: test)."""
    return _splits(d, train, 100)
