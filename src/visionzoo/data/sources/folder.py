"""An ImageFolder (root/<class>/<images...>) that survives real-world folders.

Differences from torchvision's ImageFolder: a fixed class list can be imposed
(so a validation split can never silently get shifted labels), symlink loops
are walked once, hidden files are ignored, odd pixel modes are converted to
8-bit RGB properly, and undecodable files come back as None so that
the loader's ``collate_skip_bad`` (loading/collate.py) can drop and count them instead of crashing an epoch.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from visionzoo.data.sources.class_folders import VAL_DIR_NAMES, class_dir_of, find_classes, is_hidden, val_dir_of
from visionzoo.data.sources.scan_cache import scan_classes
from visionzoo.data.sources.splits import Splits, existing_dir
from visionzoo.errors import UserError

if TYPE_CHECKING:
    from visionzoo.config import DataConfig

__all__ = ["IMAGE_EXTENSIONS", "VAL_DIR_NAMES", "ImageFolderDataset", "Unreadable", "find_classes",
           "imagefolder_splits", "load_image", "with_bad_names"]

# ImageFile.LOAD_TRUNCATED_IMAGES is deliberately left at Pillow's default
# (False): a truncated file must raise in __getitem__ and be counted as bad,
# not be half-decoded into an image with a grey bottom that trains silently.

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
)

# What a broken or non-image file can raise while Pillow opens and decodes it.
# UnidentifiedImageError is an OSError, listed for the reader. struct.error
# and EOFError come out of some plugins (TIFF, GIF) on cut-off headers;
# DecompressionBombError is Pillow refusing an absurdly large image.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    UnidentifiedImageError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)

# Unsigned 16-bit greyscale modes (Pillow's names for the byte orders).
_UNSIGNED_16_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


def _scan_class_dir(class_dir: str, walked: list[str] | None = None) -> list[str]:
    """All image files below ``class_dir`` (links followed, each real folder once), sorted;
    the folders listed are appended to ``walked`` (the scan cache watches their mtimes)."""
    found: list[str] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            # A link back to a folder already walked (a loop, or two links to
            # one folder): walking it again would loop or duplicate samples.
            dirnames[:] = []
            continue
        visited.add(real)
        if walked is not None:
            walked.append(dirpath)
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        for name in filenames:
            if is_hidden(name):  # .DS_Store, ._foo.jpg (macOS resource forks), editor temp files
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.join(dirpath, name))
    found.sort()
    return found


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _UNSIGNED_16_MODES or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        if mode in _UNSIGNED_16_MODES:
            lo, hi = 0, 65535
        elif arr.size and arr.min() >= 0 and arr.max() <= 65535:
            # Pillow reads some 16-bit files (e.g. 16-bit TIFF, PNG in older
            # Pillow releases) into the 32-bit "I" mode; their real range is 16 bits.
            lo, hi = 0, 65535
        else:
            lo, hi = -(2**31), 2**31 - 1
        # Scale the mode's whole range onto 0..255. Pillow's own convert("L")
        # clips instead, which turns nearly every 16-bit image pure white.
        scaled = np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if mode == "P":
        # A palette may carry transparency; go through RGBA so it is honoured.
        mode = "RGBA" if "transparency" in img.info else "RGB"
        img = img.convert(mode)
        if mode == "RGB":
            return img
    if img.mode in {"RGBA", "LA", "PA", "La", "RGBa"}:
        # Alpha is composited onto black (transparent -> black, half-transparent
        # -> darkened) rather than dropped: the colour under a fully
        # transparent pixel is undefined and often garbage.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, CMYK, YCbCr, F (float, clipped by Pillow), ...
    return img.convert("RGB")


def load_image(source: str | os.PathLike | bytes | IO[bytes],
               transform: Callable[[Image.Image], Any] | None = None) -> Any:
    """Decode an image (a path, its bytes, or a binary file object) to 8-bit RGB and apply
    ``transform``; None when it cannot be decoded. The one decode of every file-based reader
    (ImageFolder here, tar and parquet shards in data/sources/shards.py).

    A transform with ``prepare`` sees the opened image before it is decoded: it draws its crop on
    the full size and may ask the JPEG decoder for a smaller image (draft mode); it is then called
    as ``transform(rgb, prepared)``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    prepare = getattr(transform, "prepare", None)
    try:
        img = Image.open(source)
    except DECODE_ERRORS:
        return None
    with img:
        prepared = prepare(img) if prepare is not None else None
        try:
            # load() forces the full decode here, so truncated data raises
            # inside this try rather than later in the transform.
            img.load()
            rgb = to_rgb(img)
        except DECODE_ERRORS:
            return None
    if rgb is img and img.readonly:
        # A memory-mapped file (uncompressed formats): detach the pixels from the file.
        rgb = img.copy()
    if transform is None:
        return rgb
    return transform(rgb, prepared) if prepare is not None else transform(rgb)


class ImageFolderDataset(Dataset):
    """Images in ``root/<class>/**/<file>``, labelled by class folder.

    ``classes`` fixes the class list (pass the training split's classes when
    building a validation split); a folder in ``root`` outside that list is an
    error. ``empty_classes`` names the classes with no images here; they keep
    their index so labels stay aligned. ``__getitem__`` returns None for files
    that cannot be decoded: use ``collate_skip_bad`` as the DataLoader's collate_fn.
    """

    def __init__(self, root: str | Path, classes: list[str] | None = None,
                 transform: Callable[[Image.Image], Any] | None = None, scan_cache: bool = True) -> None:
        self.root = str(root)
        found = find_classes(root)
        if classes is None:
            classes = found
        else:
            known = set(classes)
            for name in found:
                if name not in known:
                    raise UserError(
                        f"class '{name}' in {root} is not among the {len(classes)} training classes"
                    )
        self.classes: list[str] = list(classes)
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform

        self.samples: list[tuple[str, int]] = []
        self.empty_classes: list[str] = []
        present = set(found)
        # The file lists: cached per folder, scanned by rank 0 only (data/sources/scan_cache.py).
        lists, self.scan_state = scan_classes(self.root, [c for c in self.classes if c in present], _scan_class_dir,
                                              sorted(IMAGE_EXTENSIONS), use_cache=scan_cache)
        for name in self.classes:
            paths = lists.get(name, [])
            if not paths:
                self.empty_classes.append(name)
            self.samples.extend((p, self.class_to_idx[name]) for p in paths)
        if not self.samples:
            raise UserError(
                f"image folder {root} has no image files (looked for "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))} in its class folders)"
            )
        self.targets: list[int] = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, target = self.samples[index]
        img = load_image(path, self.transform)
        return None if img is None else (img, target)

    def sample_name(self, index: int) -> str:
        """The path of sample ``index`` (how unreadable images are named)."""
        return self.samples[index][0]

    def __getitems__(self, indices: list[int]) -> list:
        """A batch's items (DataLoader calls this when it exists), with the paths of the
        undecodable ones attached, so collate_skip_bad can name them."""
        return with_bad_names([self[i] for i in indices], [self.sample_name(i) for i in indices])


def imagefolder_splits(d: DataConfig, train: bool) -> Splits:
    """The reader of data.name=imagefolder: ``data.path``/train/<class>/... and
    ``data.path``/val/<class>/... (or validation/, test/)."""
    root = existing_dir(d.path, "an ImageFolder data set")
    val_dir = val_dir_of(root)
    if val_dir is None:
        raise UserError(f"{root} has no val/ folder (expected {root}/train/<class>/... and {root}/val/<class>/...)")
    train_dir = root / "train"
    if train and not train_dir.is_dir():
        raise UserError(f"{root} has no train/ folder (expected {root}/train/<class>/...)")
    # Labels are the training split's class folders, so val indices always mean the same class.
    classes = find_classes(class_dir_of(root))
    train_ds = ImageFolderDataset(train_dir, classes, scan_cache=d.scan_cache) if train else None
    return Splits(train_ds, ImageFolderDataset(val_dir, classes, scan_cache=d.scan_cache), classes)


class _Items(list):
    """A batch's items plus ``bad``: the names of the items that are None."""

    bad: tuple[str, ...] = ()


def with_bad_names(items: list, names: list[str]) -> list:
    """``items`` (a batch, None for an undecodable image) carrying the names of its None items."""
    out = _Items(items)
    out.bad = tuple(name for name, item in zip(names, items, strict=True) if item is None)  # a name per item
    return out


class Unreadable(int):
    """How many images of a batch could not be decoded, with their names (paths, or shard and
    key) where the reader knows them, and their positions in the batch as the sampler made it
    (grouped BatchNorm keeps the other images' groups aligned): an int wherever a count is expected."""

    names: tuple[str, ...] = ()
    positions: tuple[int, ...] | None = None  # None: not known (the dropped images' places)

    def __new__(cls, count: int, names: tuple[str, ...] = (), positions: tuple[int, ...] | None = None) -> Unreadable:
        obj = super().__new__(cls, count)
        obj.names = tuple(names)
        obj.positions = tuple(positions) if positions is not None else None
        return obj

    def __reduce__(self):  # loader workers send it to the main process pickled
        return Unreadable, (int(self), self.names, self.positions)

