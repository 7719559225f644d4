"""The classes of a data set without reading it: an ImageFolder's class sub-folders, a packed
folder's manifest, the fixed classes of CIFAR and (Fashion-)MNIST. No torch here, so the command
line can say how many classes training will use (``visionzoo recipes --show R --data DIR``)
before anything heavy is imported."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from visionzoo.data.sources.idx import FASHION_MNIST_CLASSES, MNIST_CLASSES
from visionzoo.errors import UserError

if TYPE_CHECKING:
    from visionzoo.config import DataConfig

VAL_DIR_NAMES = ("val", "validation", "test")  # an ImageFolder's validation split, first found
FIXED_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": len(MNIST_CLASSES),
                 "fashion_mnist": len(FASHION_MNIST_CLASSES)}
MANIFEST = "manifest.json"  # what visionzoo data pack writes beside its shards


def is_hidden(name: str) -> bool:
    """Files and folders an ImageFolder ignores: .DS_Store, ._foo.jpg, .git, editor temp files."""
    return name.startswith(".")


def find_classes(root: str | Path) -> list[str]:
    """Return the sorted names of the non-hidden sub-folders of ``root``."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"image folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"image folder path is not a folder: {root}")
    with os.scandir(root) as it:
        # is_dir() follows symlinks, so a class folder may be a link.
        classes = sorted(e.name for e in it if not is_hidden(e.name) and e.is_dir())
    if not classes:
        raise UserError(f"image folder {root} has no class sub-folders (expected root/<class>/<images>)")
    return classes


def val_dir_of(root: Path) -> Path | None:
    """The validation split of an ImageFolder root (val/, validation/ or test/), or None."""
    return next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)


def class_dir_of(root: Path) -> Path | None:
    """The folder whose sub-folders are an ImageFolder's classes: train/, else the validation
    split (labels always follow the training split's class folders)."""
    return root / "train" if (root / "train").is_dir() else val_dir_of(root)


def _manifest_classes(folder: Path) -> list[str] | None:
    """Class names of a local shard folder (manifest.json, else classes.txt), or None."""
    try:
        if (folder / MANIFEST).is_file():
            classes = json.loads((folder / MANIFEST).read_text()).get("classes")
            return list(classes) if isinstance(classes, list) and classes else None
        if (folder / "classes.txt").is_file():
            return [ln.strip() for ln in (folder / "classes.txt").read_text().splitlines() if ln.strip()] or None
    except (OSError, ValueError, AttributeError):
        return None
    return None


def count_classes(d: DataConfig) -> tuple[int | None, str]:
    """How many classes training on DataConfig ``d`` will have, and where that comes from; the
    count is None (with the reason) when it cannot be known without reading the data."""
    if d.name == "synthetic":
        return d.num_classes, "data.num_classes (synthetic data)"
    if d.name in FIXED_CLASSES:
        return FIXED_CLASSES[d.name], f"the classes of {d.name}"
    if not d.path:
        return None, "training counts the classes in data.path (give --data DIR to count them here)"
    if "://" in d.path:
        return None, f"training reads the classes from {d.path} when it starts"
    root = Path(d.path).expanduser()
    if not root.is_dir():
        return None, f"the data folder {d.path} does not exist"
    packed = _manifest_classes(root)
    if packed is not None and not (root / "train").is_dir():
        return len(packed), f"the classes in {root / MANIFEST}"
    if d.name != "imagefolder":
        return None, f"training reads the classes from {root} when it starts"
    folder = class_dir_of(root)
    if folder is None:
        return None, f"{root} has no train/ or val/ folder of class folders"
    try:
        return len(find_classes(folder)), f"the class folders of {folder}"
    except UserError as err:
        return None, str(err)
