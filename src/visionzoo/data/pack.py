"""``visionzoo data pack`` and ``visionzoo data verify``: an ImageFolder tree (or CIFAR pickles,
or MNIST-style IDX files) as WebDataset tar shards or as Hugging Face parquet files.

Output (webdataset): ``OUT/train-000000.tar ...``, ``OUT/val-000000.tar ...``; (hfds): the Hub's
layout, ``OUT/data/train-00000-of-000NN.parquet`` and ``OUT/data/validation-...`` with
``image`` {bytes, path} and ``label`` (a ClassLabel with the class names, in the schema metadata
``datasets`` reads). Both: ``OUT/manifest.json`` (classes; per split and per shard the images,
images per class, bytes and sha256) and ``OUT/classes.txt``.

The output is a function of the input and the options only: the training samples are shuffled
once with ``--seed`` (so that a shard holds many classes and a shuffle buffer can mix them), the
validation samples keep their sorted order; tar members carry a fixed mtime, owner and mode;
workers only encode, the main process writes in order, so any ``--workers`` gives the same bytes.
Image files are copied as they are unless ``--resize S`` is given, which re-encodes (JPEG,
quality ``--quality``) every image whose short side exceeds S at short side S — the FFCV-style
pre-resize that makes decoding several times cheaper. Files in other formats (BMP, TIFF, GIF, ...)
and in-memory arrays (CIFAR, IDX) become PNG; files that cannot be decoded while doing so are
left out and listed in the manifest."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visionzoo.data.sources.manifest import checked_splits
from visionzoo.data.sources.table import data_source, names
from visionzoo.errors import UserError, first_line
from visionzoo.runtime import default_signals

FORMATS = tuple(names(packed=True))  # the packed sources of the table (data/sources/table.py)
KEEP_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30}
TAR_BLOCK = 512
ROWS_PER_GROUP = 64  # parquet row group: what a reader holds in memory at once


def parse_size(text: str) -> int:
    """'512MB' → bytes (KB, MB, GB are powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"--shard-size {text!r}: give a size such as 512MB, 1GB or 100000 (bytes)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size < 1:
        raise UserError(f"--shard-size {text!r} must be positive")
    return size


@dataclass
class Source:
    """What to pack: class names and, per split, the items (file paths or image arrays) and labels."""

    kind: str
    root: Path
    classes: list[str]
    splits: dict[str, tuple[list[Any], list[int]]] = field(default_factory=dict)


def _imagefolder_source(root: Path, kind: str) -> Source:
    from visionzoo.data.sources.class_folders import class_dir_of, find_classes, val_dir_of
    from visionzoo.data.sources.folder import ImageFolderDataset

    train_dir, val_dir = root / "train", val_dir_of(root)
    classes = find_classes(class_dir_of(root))
    src = Source(kind, root, classes)
    for name, folder in (("train", train_dir), ("val", val_dir)):
        if folder is not None and folder.is_dir():
            ds = ImageFolderDataset(folder, classes)
            src.splits[name] = ([p for p, _ in ds.samples], [t for _, t in ds.samples])
    return src


def _array_source(root: Path, kind: str) -> Source:
    """An in-memory source (CIFAR, IDX, ...) read by its reader, its images as HWC arrays (H×W for grey)."""
    from visionzoo.config import DataConfig

    splits = data_source(kind).read(DataConfig(name=kind, path=str(root)), train=True)
    items = {}
    for name, ds in (("train", splits.train), ("val", splits.val)):
        images = np.ascontiguousarray(ds.images.permute(0, 2, 3, 1).numpy())  # TensorImageDataset: NCHW
        items[name] = (list(images[..., 0] if images.shape[-1] == 1 else images), list(ds.targets))
    return Source(kind, root, list(splits.classes), items)


def find_source(src: str, kind: str = "auto") -> Source:
    """An ImageFolder (SRC/train + SRC/val) or in-memory (CIFAR, IDX) source; ``kind`` (a data
    source that can be read by index) overrides the guess."""
    root = Path(src).expanduser()
    if not root.is_dir():
        raise UserError(f"source folder not found: {root}")
    if kind == "auto":
        kind = _guess_kind(root)
    elif kind not in names(map_style=True, generated=False):
        raise UserError(f"--source {kind!r} is not one of auto, {', '.join(names(map_style=True, generated=False))}")
    return _array_source(root, kind) if data_source(kind).in_memory else _imagefolder_source(root, kind)


def _guess_kind(root: Path) -> str:
    """The data source a folder looks like, from its file names."""
    names_here = {p.name for p in root.iterdir()}
    if "train" in names_here and (root / "train").is_dir():
        return "imagefolder"
    if any(n.startswith("cifar-100") for n in names_here) or {"train", "meta"} <= names_here:
        return "cifar100"
    if any(n.startswith("cifar-10") for n in names_here) or "data_batch_1" in names_here:
        return "cifar10"
    if any(n.startswith("train-images") for n in names_here):
        return "fashion_mnist" if "fashion" in str(root).lower() else "mnist"
    raise UserError(f"{root}: not an ImageFolder (train/ and val/ class folders), CIFAR or IDX folder; "
                    f"name the kind with --source")


def encode(job: tuple[Any, int | None, int, bool]) -> tuple[str | None, bytes | str]:
    """One item as (extension, bytes) to store, or (None, why) when it cannot be read (with
    ``check``, also when a file kept as it is does not decode in full)."""
    item, resize, quality, check = job
    if isinstance(item, np.ndarray):
        img = Image.fromarray(item)
        ext, data = None, None
    else:
        ext = KEEP_EXTS.get(os.path.splitext(item)[1].lower())
        try:
            data = Path(item).read_bytes()
        except OSError as err:
            return None, f"cannot read: {first_line(err)}"
        if ext is not None and not resize and not check:
            return ext, data
        from visionzoo.data.sources.folder import DECODE_ERRORS, to_rgb

        try:
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                img = opened if opened.mode in ("L", "RGB") else to_rgb(opened)
                img = img.copy()
        except DECODE_ERRORS as err:
            return None, f"cannot be decoded: {first_line(err)}"
    short = min(img.size)
    if resize and short > resize:
        w, h = img.size
        img = img.resize((max(1, round(w * resize / short)), max(1, round(h * resize / short))), Image.BICUBIC)
    elif ext is not None and data is not None:
        return ext, data  # small enough already: the original bytes
    out = io.BytesIO()
    if resize and short > resize:
        img.save(out, format="JPEG", quality=quality)
        return "jpg", out.getvalue()
    img.save(out, format="PNG")
    return "png", out.getvalue()


def _tar_size(n: int) -> int:
    return TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _TarShards:
    """Writes samples into OUT/{split}-NNNNNN.tar with webdataset's TarWriter, reproducibly."""

    suffix = ".tar"

    def __init__(self, out: Path, split: str, classes: list[str]):
        self.out, self.split, self.writer, self.file = out, split, None, None

    def name(self, index: int) -> str:
        return f"{self.split}-{index:06d}.tar"

    def size(self, ext: str, data: bytes, label: int) -> int:
        return _tar_size(len(data)) + _tar_size(len(str(label)))

    def open(self, index: int) -> None:
        from webdataset import TarWriter

        self.file = open(self.out / self.name(index), "wb")
        self.writer = TarWriter(self.file, user="visionzoo", group="visionzoo", mode=0o444, mtime=0, encoder=False)

    def write(self, key: str, ext: str, data: bytes, label: int, rel: str | None) -> None:
        self.writer.write({"__key__": key, ext: data, "cls": str(label).encode()})

    def close(self) -> None:
        self.writer.close()
        self.file.close()

    def finish(self, names: list[str]) -> list[str]:
        return names


class _ParquetShards:
    """Writes samples into OUT/data/{split}-NNNNN-of-MMMMM.parquet in the Hub's image layout."""

    def __init__(self, out: Path, split: str, classes: list[str]):
        import datasets

        self.out, self.split = out / "data", "validation" if split == "val" else split
        self.out.mkdir(exist_ok=True)
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
        self.schema = features.arrow_schema
        self.writer, self.rows = None, []

    def name(self, index: int) -> str:
        return f"{self.split}-{index:05d}.parquet"

    def size(self, ext: str, data: bytes, label: int) -> int:
        return len(data) + 32

    def open(self, index: int) -> None:
        import pyarrow.parquet as pq

        self.writer = pq.ParquetWriter(self.out / self.name(index), self.schema, compression="none")

    def _flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            images = [{"bytes": d, "path": p} for d, p, _ in self.rows]
            labels = [t for _, _, t in self.rows]
            self.writer.write_table(pa.table({"image": images, "label": labels}, schema=self.schema))
            self.rows = []

    def write(self, key: str, ext: str, data: bytes, label: int, rel: str | None) -> None:
        self.rows.append((data, rel or f"{key}.{ext}", label))
        if len(self.rows) >= ROWS_PER_GROUP:
            self._flush()

    def close(self) -> None:
        self._flush()
        self.writer.close()

    def finish(self, names: list[str]) -> list[str]:
        """Rename to the Hub's -NNNNN-of-MMMMM names now that the count is known."""
        final = []
        for i, n in enumerate(names):
            new = f"{self.split}-{i:05d}-of-{len(names):05d}.parquet"
            os.replace(self.out / n, self.out / new)
            final.append(new)
        return final


def _progress(total: int, desc: str):
    from tqdm import tqdm

    # A bar on a terminal; otherwise a line every 10%.
    return tqdm(total=total, desc=desc, unit="img", disable=None if sys.stderr.isatty() else True,
                mininterval=0.5, file=sys.stderr)


def _encoded(items: list[Any], resize: int | None, quality: int, workers: int, check: bool = True) -> Iterator[tuple]:
    jobs = ((it, resize, quality, check) for it in items)
    if workers > 1:
        from multiprocessing import get_context

        with get_context("fork").Pool(workers, initializer=default_signals) as pool:
            yield from pool.imap(encode, jobs, chunksize=16)
    else:
        yield from map(encode, jobs)


@dataclass(frozen=True)
class PackOptions:
    """How ``visionzoo data pack`` writes shards: at most ``shard_size`` ('512MB', '1GB', bytes)
    and ``shard_samples`` images (0: no limit) each; ``resize`` S re-encodes images whose short
    side exceeds S as JPEG of ``quality`` (0: files copied as they are); ``seed`` shuffles the
    training split once; ``workers`` encode in parallel; ``check`` decodes every image once."""

    shard_size: str = "512MB"
    shard_samples: int = 0
    resize: int = 0
    quality: int = 90
    seed: int = 0
    workers: int = 0
    check: bool = True


def _require_writer(fmt: str) -> None:
    """The packages the writer of ``fmt`` needs, or a UserError that says how to install them."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "hfds":
        try:
            import datasets  # noqa: F401
            import pyarrow  # noqa: F401
        except ImportError:
            raise UserError("--format hfds needs datasets and pyarrow: pip install 'visionzoo[shards]'") from None
    elif fmt == "webdataset":
        try:
            import webdataset  # noqa: F401
        except ImportError:
            raise UserError("--format webdataset needs webdataset: pip install 'visionzoo[shards]'") from None


def pack(src: str, out: str, fmt: str = "webdataset", source: str = "auto", options: PackOptions | None = None) -> dict:
    """Convert ``src`` into shards in ``out``; returns (and writes) the manifest. ``source``
    overrides the guess of find_source. With ``options.check`` every image is decoded once, and
    those that do not decode are left out and listed in the manifest's ``skipped`` (without it,
    files are copied unread)."""
    opts = options or PackOptions()
    _require_writer(fmt)
    max_bytes = parse_size(opts.shard_size)
    if opts.resize < 0 or opts.shard_samples < 0 or not 1 <= opts.quality <= 100:
        raise UserError("--resize and --shard-samples must be >= 0, --quality 1..100")
    data = find_source(src, source)
    out_dir = Path(out).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"output folder {out_dir} is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"format": fmt, "version": 1, "classes": data.classes, "source": data.kind,
                      "options": {"resize": opts.resize, "shard_size": max_bytes, "shard_samples": opts.shard_samples,
                                  "seed": opts.seed, "quality": opts.quality, "check": opts.check}, "splits": {}}
    nc = len(data.classes)
    for split in data.splits:
        writer = (_TarShards if fmt == "webdataset" else _ParquetShards)(out_dir, split, data.classes)
        shards, skipped = _write_split(writer, data, split, opts, max_bytes)
        names = writer.finish([s["name"] for s in shards])
        for s, name in zip(shards, names, strict=True):  # finish names each shard
            path = out_dir / ("data" if fmt == "hfds" else "") / name
            s.update(name=os.path.relpath(path, out_dir), bytes=path.stat().st_size, sha256=sha256_of(path))
        key = "validation" if (fmt == "hfds" and split == "val") else split
        manifest["splits"][key] = {
            "samples": sum(s["samples"] for s in shards),
            "per_class": [sum(s["per_class"][k] for s in shards) for k in range(nc)],
            "skipped": skipped, "shards": shards}
        print(f"{split}: {manifest['splits'][key]['samples']} images in {len(shards)} shard(s)"
              + (f", {len(skipped)} left out (see manifest.json)" if skipped else ""), flush=True)
    (out_dir / "manifest.json").write_text(manifest_text(manifest))
    (out_dir / "classes.txt").write_text("".join(f"{c}\n" for c in data.classes))
    print(f"wrote {out_dir} ({fmt}); check it with: visionzoo data verify {out_dir}", flush=True)
    return manifest


def _write_split(writer: _TarShards | _ParquetShards, data: Source, split: str, opts: PackOptions,
                 max_bytes: int) -> tuple[list[dict], list[str]]:
    """Write the images of ``split`` through ``writer``, a new shard whenever the current one is
    full; returns the shards (name, samples, bytes, per_class) and the images left out."""
    items, labels = data.splits[split]
    order = list(range(len(items)))
    if split == "train":
        random.Random(opts.seed).shuffle(order)
    shards: list[dict] = []
    skipped: list[str] = []
    cur, written = None, 0
    bar = _progress(len(order), f"pack {split}")
    encoded = _encoded([items[i] for i in order], opts.resize, opts.quality, opts.workers, opts.check)
    for i, (ext, payload) in zip(order, encoded, strict=True):  # one encoded sample per item
        bar.update(1)
        rel = os.path.relpath(items[i], data.root) if isinstance(items[i], str) else None
        if ext is None:
            skipped.append(f"{rel or i}: {payload}")
            continue
        size = writer.size(ext, payload, labels[i])
        if cur is not None and _full(cur, size, opts.shard_samples, max_bytes):
            writer.close()
            cur = None
        if cur is None:
            writer.open(len(shards))
            cur = {"name": writer.name(len(shards)), "samples": 0, "bytes": 0, "per_class": [0] * len(data.classes)}
            shards.append(cur)
        writer.write(f"{written:08d}", ext, payload, labels[i], rel)
        written += 1
        cur["samples"] += 1
        cur["bytes"] += size
        cur["per_class"][labels[i]] += 1
    bar.close()
    if cur is not None:
        writer.close()
    return shards, skipped


def _full(shard: dict, size: int, shard_samples: int, max_bytes: int) -> bool:
    """Whether a sample of ``size`` bytes would take ``shard`` past its limits."""
    return shard["bytes"] + size > max_bytes or bool(shard_samples and shard["samples"] >= shard_samples)


def manifest_text(manifest: dict) -> str:
    """The manifest as JSON, one line per list of numbers or names (a 1000-class per_class list
    on one line, not a thousand)."""
    text = json.dumps(manifest, indent=1)

    def one_line(m: re.Match) -> str:
        return "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]"

    return re.sub(r"\[\n\s*([^\[\]{}]*?)\n\s*\]", one_line, text) + "\n"


def verify(out: str, deep: bool = False) -> dict:
    """Re-check the shards in ``out`` against its manifest: present, same size and sha256 (and,
    with ``deep``, the same number of samples when read). Raises UserError naming the shards
    that differ; returns a summary."""
    root = Path(out).expanduser()
    path = root / "manifest.json"
    if not path.is_file():
        raise UserError(f"{root} has no manifest.json (written by visionzoo data pack)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a visionzoo manifest: {first_line(err)}") from None
    splits = checked_splits(manifest, str(path), ("name", "bytes", "sha256", "samples"))  # before any file is read
    problems, total, n_shards = [], 0, 0
    for split, shards in splits.items():
        for s in shards:
            n_shards += 1
            p = root / s["name"]
            if not p.is_file():
                problems.append(f"{s['name']} (missing)")
                continue
            if p.stat().st_size != s["bytes"]:
                problems.append(f"{s['name']} ({p.stat().st_size} bytes, the manifest says {s['bytes']})")
                continue
            if sha256_of(p) != s["sha256"]:
                problems.append(f"{s['name']} (sha256 differs)")
                continue
            if deep:
                n = _count(p, manifest.get("format", "webdataset"))
                if n != s["samples"]:
                    problems.append(f"{s['name']} ({n} samples, the manifest says {s['samples']})")
                    continue
            total += s["samples"]
        print(f"{split}: {len(shards)} shard(s), {sum(s['samples'] for s in shards)} images", flush=True)
    if problems:
        raise UserError(f"{len(problems)} of {n_shards} shard(s) in {root} do not match manifest.json: "
                        + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
    print(f"{root}: all {n_shards} shard(s) match manifest.json" + (" (samples counted)" if deep else ""), flush=True)
    return {"shards": n_shards, "samples": total}


def _count(path: Path, fmt: str) -> int:
    if fmt == "hfds":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    from visionzoo.data.sources.webdataset import count_tar

    return count_tar(str(path), 60.0)[0]
