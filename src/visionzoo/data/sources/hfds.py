"""Hugging Face ``datasets`` data on local disk (``data.name: hfds``), streamed as shards.

Two layouts, as the Hub and the library write them:
- parquet files with an ``image`` column ({bytes, path} struct, or plain binary) and an integer
  ``label`` column: the Hub's imagenet-1k layout, ``DATA/data/train-00000-of-00294.parquet`` and
  ``DATA/data/validation-*.parquet`` (also ``DATA/{split}-*.parquet``, ``DATA/{split}/*.parquet``,
  or patterns in ``data.train`` / ``data.val``). Each file is a shard; it is read a row group at
  a time through a memory map (pyarrow), and its row count comes from the parquet footer.
- a ``save_to_disk`` folder (``DatasetDict``: ``DATA/dataset_dict.json`` with one sub-folder per
  split, or ``data.train`` / ``data.val`` naming two ``Dataset`` folders), opened with
  ``datasets.load_from_disk``; each of its Arrow files is a shard, memory-mapped by ``datasets``.

Class names come from the ``label`` feature (a ClassLabel, kept in the parquet schema metadata
or the dataset's features), else from ``classes.txt`` / ``manifest.json`` beside the data, else
the labels are counted. Sharding over ranks and workers, shuffling, resume and faults: as for
tar shards (data/sources/shards.py)."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from visionzoo.data.sources.shards import Shard, ShardStream
from visionzoo.data.sources.splits import Splits, check_folder
from visionzoo.errors import UserError, first_line

if TYPE_CHECKING:
    import pyarrow

    from visionzoo.config import DataConfig

IMAGE, LABEL = "image", "label"
VAL_SPLITS = ("validation", "val", "test")
BATCH_ROWS = 64  # rows converted to Python objects at once


def _need_libs() -> None:
    try:
        import datasets  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError("data.name=hfds needs datasets and pyarrow: pip install 'visionzoo[shards]'") from None


def check_schema(schema: pyarrow.Schema, where: str) -> None:
    """The image and label columns must be there, with types this reader understands."""
    import pyarrow as pa

    def binary(t: pyarrow.DataType) -> bool:  # never a string: a string of bytes would be taken for a file name
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    names = schema.names
    image = schema.field(IMAGE).type if IMAGE in names else None
    ok_image = image is not None and (binary(image) or (
        pa.types.is_struct(image) and image.get_field_index("bytes") >= 0 and binary(image.field("bytes").type)
        and (image.get_field_index("path") < 0 or pa.types.is_string(image.field("path").type)
             or pa.types.is_large_string(image.field("path").type))))
    ok_label = LABEL in names and pa.types.is_integer(schema.field(LABEL).type)
    if not (ok_image and ok_label):
        columns = ", ".join(f"{n} ({schema.field(n).type})" for n in names)
        raise UserError(f"{where}: expected an '{IMAGE}' column ({{bytes: binary, path: string}} or binary) and an "
                        f"integer '{LABEL}' column; it has {columns}")


def _rows(name: str, batch: pyarrow.RecordBatch, first: int, start: int) -> Iterator:
    """The samples of one record batch (``first``: the row number of its first row)."""
    import pyarrow as pa

    images, labels = batch.column(IMAGE), batch.column(LABEL).to_pylist()
    if pa.types.is_struct(images.type):
        data = images.field("bytes").to_pylist()
        paths = images.field("path").to_pylist() if images.type.get_field_index("path") >= 0 else [None] * len(data)
    else:
        data, paths = images.to_pylist(), [None] * len(labels)
    for k, (img, path, label) in enumerate(zip(data, paths, labels, strict=True)):  # columns of one batch
        row = first + k
        if row < start:
            continue
        key = f"{name}:{row}"
        if img is None:
            local = _inside_data_folder(path, name) if path else None
            if local is None:
                why = f" (path {path} is not a file in the data folder)" if path else ""
                yield key, None, label, "no image bytes" + why
                continue
            img = local.read_bytes()  # an image kept as a file next to the parquet files
        yield key, img, label, None if label is not None else "no label"


def _inside_data_folder(path: str, shard: str) -> Path | None:
    """The file a row's ``image.path`` names, when the row has no bytes: only a file inside the
    folder that holds the shard (a relative path is taken from there), never anywhere else the
    process could read; None otherwise."""
    root = Path(shard).resolve().parent
    target = (root / path).resolve()  # an absolute ``path`` replaces root here; checked below
    if not target.is_relative_to(root) or not target.is_file():
        return None
    return target


class ParquetReader:
    """Reads a parquet shard a row group at a time (memory-mapped), from row ``start`` on."""

    remote = False

    def read(self, shard: Shard, start: int) -> Iterator:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(shard.name, memory_map=True)
        check_schema(pf.schema_arrow, shard.name)
        first, groups = 0, []
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if not groups and first + n <= start:
                first += n  # a row group wholly before `start`: not read at all
                continue
            groups.append(g)
        if not groups:
            return
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=[IMAGE, LABEL]):
            yield from _rows(shard.name, batch, first, start)
            first += batch.num_rows


class ArrowReader:
    """Reads an Arrow file of a ``save_to_disk`` folder, memory-mapped by ``datasets``."""

    remote = False

    def read(self, shard: Shard, start: int) -> Iterator:
        from datasets import Dataset

        table = Dataset.from_file(shard.name).data.table
        check_schema(table.schema, shard.name)
        first = start
        for batch in table.select([IMAGE, LABEL]).slice(start).to_batches(max_chunksize=BATCH_ROWS):
            yield from _rows(shard.name, batch, first, start)
            first += batch.num_rows


def _parquet_split(files: list[str], what: str) -> tuple[list[Shard], list[str] | None, list[int]]:
    """Shards (row counts from the footers), class names from the schema metadata (or None)
    and the labels' maximum when there are no names."""
    import datasets
    import pyarrow.parquet as pq

    shards, names = [], None
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError ...
            raise UserError(f"{f}: not a readable parquet file: {first_line(err)}") from None
        check_schema(pf.schema_arrow, f)
        shards.append(Shard(f, pf.metadata.num_rows))
        if names is None and pf.schema_arrow.metadata and b"huggingface" in pf.schema_arrow.metadata:
            feature = datasets.Features.from_arrow_schema(pf.schema_arrow).get(LABEL)
            names = list(getattr(feature, "names", None) or []) or None
    return shards, names, []


def _max_label(files: list[str], arrow: bool) -> int:
    import pyarrow.compute as pc

    best = -1
    for f in files:
        if arrow:
            from datasets import Dataset

            col = Dataset.from_file(f).data.table.column(LABEL)
        else:
            import pyarrow.parquet as pq

            col = pq.read_table(f, columns=[LABEL]).column(LABEL)
        m = pc.max(col).as_py()
        best = max(best, m if m is not None else -1)
    return best


def _saved_split(folder: str) -> tuple[list[Shard], list[str] | None]:
    """Shards of a save_to_disk Dataset folder (its Arrow files) and its class names."""
    from datasets import Dataset, load_from_disk

    try:
        ds = load_from_disk(folder)
    except Exception as err:  # noqa: BLE001 - datasets raises FileNotFoundError, ValueError ...
        raise UserError(f"{folder}: not a saved Hugging Face dataset: {first_line(err)}") from None
    if not isinstance(ds, Dataset):
        raise UserError(f"{folder} holds several splits ({', '.join(ds)}): give it as --data, or one split's folder")
    check_schema(ds.data.table.schema, folder)
    files = [c["filename"] for c in ds.cache_files]
    shards = [Shard(f, Dataset.from_file(f).num_rows) for f in files]
    feature = ds.features.get(LABEL)
    return shards, list(getattr(feature, "names", None) or []) or None


def _find_parquet(root: Path, split: str) -> list[str]:
    for pattern in (f"data/{split}-*.parquet", f"{split}-*.parquet", f"{split}/*.parquet", f"data/{split}/*.parquet"):
        files = sorted(glob.glob(str(root / pattern)))
        if files:
            return files
    return []


def _resolve(spec: str) -> tuple[str, list[str]]:
    """("arrow", [folder]) for a save_to_disk folder, ("parquet", files) for a pattern/file/folder."""
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "state.json").is_file():
        return "arrow", [str(p)]
    if p.is_dir():
        files = sorted(glob.glob(str(p / "*.parquet")))
    else:
        from braceexpand import braceexpand

        files = sorted(f for item in braceexpand(str(p)) for f in glob.glob(item))
    if not files:
        raise UserError(f"hfds: {spec} matches no parquet file and is not a save_to_disk folder")
    return "parquet", files


def _split_specs(d: DataConfig, train: bool) -> tuple[tuple[str, list[str]] | None, tuple[str, list[str]], Path | None]:
    """(train source, val source, the folder class files may lie in)."""
    if d.train or d.val:
        if (train and not d.train) or not d.val:
            raise UserError("hfds: set both data.train and data.val (or neither, and --data)")
        val = _resolve(d.val)
        return (_resolve(d.train) if train else None), val, Path(val[1][0]).parent
    if not d.path:
        raise UserError("data.name=hfds needs --data: a folder with the Hub's parquet layout or a save_to_disk folder")
    root = Path(d.path).expanduser()
    if not root.is_dir():
        raise UserError(f"data path does not exist or is not a folder: {root}")
    dd = root / "dataset_dict.json"
    if dd.is_file():
        splits = json.loads(dd.read_text()).get("splits", [])
        val_name = next((s for s in VAL_SPLITS if s in splits), None)
        if "train" not in splits and train or val_name is None:
            raise UserError(f"{root}: the saved DatasetDict has splits {splits}; need train and one of {VAL_SPLITS}")
        return (("arrow", [str(root / "train")]) if train else None), ("arrow", [str(root / val_name)]), root
    if (root / "state.json").is_file():
        raise UserError(f"{root} is a single saved split: name the two splits with data.train=DIR and data.val=DIR")
    train_files = _find_parquet(root, "train")
    val_files = next((f for f in (_find_parquet(root, s) for s in VAL_SPLITS) if f), [])
    if (train and not train_files) or not val_files:
        raise UserError(f"{root}: no {'train and ' if train else ''}validation parquet files "
                        f"(expected {root}/data/train-*.parquet and {root}/data/validation-*.parquet)")
    return (("parquet", train_files) if train else None), ("parquet", val_files), root


def _load(src: tuple[str, list[str]]) -> tuple[list[Shard], list[str] | None]:
    kind, items = src
    if kind == "arrow":
        return _saved_split(items[0])
    shards, names, _ = _parquet_split(items, "parquet")
    return shards, names


def hfds_splits(d: DataConfig, train: bool) -> Splits:
    """The reader of data.name=hfds: train (when ``train``) and val ShardStreams and the class
    names; the loading layer sets the streams' transforms."""
    from visionzoo.data.sources.webdataset import class_names_beside

    _need_libs()
    train_src, val_src, folder = _split_specs(d, train)
    val_shards, val_names = _load(val_src)
    train_shards, train_names = _load(train_src) if train_src else ([], None)
    classes = train_names or val_names
    if classes is None and folder is not None:
        classes = class_names_beside(str(folder), d.io_timeout)
    if classes is None:
        top = max(_max_label([s.name for s in shards], src[0] == "arrow")
                  for src, shards in ((train_src, train_shards), (val_src, val_shards)) if src)
        if top < 0:
            raise UserError(f"hfds: no class names and no labels in {folder}")
        classes = [str(i) for i in range(top + 1)]
    def reader(src: tuple[str, list[str]]) -> ArrowReader | ParquetReader:
        return ArrowReader() if src[0] == "arrow" else ParquetReader()

    kw = dict(classes=classes, shuffle_buffer=d.shuffle_buffer, retries=0)
    train_ds = ShardStream(train_shards, reader(train_src), **kw) if train_src else None
    val_ds = ShardStream(val_shards, reader(val_src), **kw)
    return Splits(train_ds, val_ds, list(classes))


def check_path(d: DataConfig) -> None:
    """Fail early on a ``data.path`` that is not a folder (data.train / data.val patterns are
    checked when they are read)."""
    if not (d.train or d.val):
        check_folder(d)
