"""The table of data sources: one entry per ``data.name`` saying which function reads it, how its
path is checked, which splits it has and what it supports. Every choice that depends on the kind
of data — which loader, whether int8 calibration or ``visionzoo report`` can read it by index,
what ``--data synthetic`` means, what ``data pack --source`` accepts, bench's decode-free source —
asks this table instead of comparing ``data.name`` with a string.

Adding a data source: a reader in data/sources/ (``reader(d, train) -> Splits``, its datasets'
``transform`` left for the loading layer to set) and one ``DataSource`` in SOURCES below (or
``register(DataSource(...))`` from outside the package). docs/data.md lists the sources.

Layering: config.py sits below data/ and so cannot ask this table, and ``DataConfig`` no longer
checks ``data.name``. ``data_source(name)`` does; the CLI calls it right after it resolves a
config, before torch is imported, as config's own checks run (a mistyped name still answers in
half a second). Any other path to the loaders (the Python API, a checkpoint's config, a
launched worker) meets the same one-line error in ``build_datasets`` / ``check_data_path``, before
a run folder is made. This module imports neither torch nor a reader at import time: readers are
named "module:function" and imported on first use, so the early check costs nothing. (The
alternative, a list of names that data/ registers into config, would make config's answer depend
on whether data/ happened to be imported.)"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from visionzoo.errors import UserError

if TYPE_CHECKING:
    from visionzoo.config import DataConfig
    from visionzoo.data.sources.splits import Splits

__all__ = ["SOURCES", "DataSource", "data_override", "data_source", "generated_source", "names", "register"]

Function = str | Callable  # a function, or "module:function", imported when first called


def _function(ref: Function) -> Callable:
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class DataSource:
    """One data source (a ``data.name``) and what it supports."""

    name: str
    reader: Function  # (d, train) -> Splits; train is None unless ``train``; transforms left unset
    check: Function | None = "visionzoo.data.sources.splits:check_folder"  # (d) -> None, before workers start
    splits: tuple[str, ...] = ("train", "val")  # the splits it has (training reads "train", the rest "val")
    map_style: bool = True  # items by index (len, ds[i]): int8 calibration and the report's neighbour images
    in_memory: bool = False  # whole splits as TensorImageDatasets: the device-resident loader can hold them
    # Items are image files (JPEG, PNG ...): data.decode=device can read their bytes, and a folder
    # written by `data pack` (or a URL) given as --data is read in its own format instead.
    encoded: bool = False
    packed: bool = False  # `visionzoo data pack --format NAME` writes it; manifest.json names it
    remote: bool = False  # reads http(s):// and s3:// URLs
    # Made up, no files (`--data NAME` selects it): random images and labels, neither augmented nor
    # resized by the loaders; their classes are not compared with a checkpoint's.
    generated: bool = False
    default_path: str | None = None  # data.path when none is given
    stored_size: tuple[int, int] | None = None  # (height, width) of every stored image, where fixed
    num_classes: int | None = None  # where fixed

    def with_default_path(self, d: DataConfig) -> DataConfig:
        """``d`` with data.path set to the source's default when it has none."""
        return replace(d, path=self.default_path) if d.path is None and self.default_path else d

    def read(self, d: DataConfig, train: bool) -> Splits:
        """The reader's Splits of ``d`` (the training split only when ``train``)."""
        if train and "train" not in self.splits:
            raise UserError(f"data.name={self.name} has no training split (it has {', '.join(self.splits)})")
        return _function(self.reader)(self.with_default_path(d), train)

    def check_path(self, d: DataConfig) -> None:
        """Fail early, before workers are launched, on a data path the source cannot read."""
        if self.check is not None:
            _function(self.check)(self.with_default_path(d))


_S = "visionzoo.data.sources."
SOURCES: dict[str, DataSource] = {s.name: s for s in (
    DataSource("imagefolder", _S + "folder:imagefolder_splits", encoded=True),
    DataSource("cifar10", _S + "cifar:cifar10_splits", in_memory=True, stored_size=(32, 32), num_classes=10),
    DataSource("cifar100", _S + "cifar:cifar100_splits", in_memory=True, stored_size=(32, 32), num_classes=100),
    DataSource("fashion_mnist", _S + "idx:fashion_mnist_splits", in_memory=True, stored_size=(28, 28),
               num_classes=10, default_path="/usr/share/datasets/fashion-mnist"),  # Debian's dataset-fashion-mnist
    DataSource("mnist", _S + "idx:mnist_splits", in_memory=True, stored_size=(28, 28), num_classes=10),
    DataSource("synthetic", _S + "synthetic:synthetic_splits", check=None, in_memory=True, generated=True),
    DataSource("webdataset", _S + "webdataset:webdataset_splits", check=_S + "webdataset:check_path",
               map_style=False, encoded=True, packed=True, remote=True),
    DataSource("hfds", _S + "hfds:hfds_splits", check=_S + "hfds:check_path",
               map_style=False, encoded=True, packed=True),
)}


def register(source: DataSource) -> DataSource:
    """Add (or replace) a data source; ``data.name=source.name`` then reads it everywhere."""
    SOURCES[source.name] = source
    return source


def data_source(name: str) -> DataSource:
    """The source called ``name``; an unknown name is a one-line UserError with the closest one."""
    if name in SOURCES:
        return SOURCES[name]
    close = difflib.get_close_matches(str(name), list(SOURCES), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(f"data.name={name!r} is not one of {', '.join(SOURCES)}{hint}")


def names(**flags: bool) -> list[str]:
    """The sources whose fields have the given values, e.g. ``names(packed=True)``."""
    return [s.name for s in SOURCES.values() if all(getattr(s, k) == v for k, v in flags.items())]


def generated_source(value: str | None) -> DataSource | None:
    """The generated source ``--data VALUE`` names (``--data synthetic``), or None: VALUE is a path."""
    source = SOURCES.get(value) if value else None
    return source if source is not None and source.generated else None


def data_override(value: str) -> str:
    """``--data VALUE`` as a config override: data.name for a generated source, else data.path."""
    return f"data.name={value}" if generated_source(value) else f"data.path={value}"
