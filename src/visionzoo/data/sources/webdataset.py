"""WebDataset tar shards (``data.name: webdataset``): where the shards of each split are, how
many samples each holds, the class names, and reading one shard's samples.

A sample is the tar members sharing a key: ``KEY.jpg|jpeg|png|webp`` and ``KEY.cls`` (the label
as text) or ``KEY.json`` (``{"label": k}`` or a bare number), the layout ``webdataset`` and timm
write. Members are read with the ``webdataset`` library's streaming tar iterator (tarfile in
stream mode), from local files or from ``http(s)://`` and ``s3://`` URLs through fsspec (s3 needs
s3fs), with ``data.io_timeout`` seconds for a server to answer.

Splits: ``data.train`` / ``data.val`` (brace patterns such as ``/data/train-{000000..001023}.tar``,
globs, folders of ``.tar`` files or URL patterns), else from ``data.path``: a folder (local or a
URL) with ``train-*.tar`` + ``val-*.tar`` (or ``train/*.tar`` + ``val/*.tar``), or one pattern
for the training shards whose file name has ``train`` in it (``val`` in its place gives the
validation shards). Counts and classes come from ``manifest.json`` beside the shards (what
``visionzoo data pack`` writes), else from ``classes.txt`` / ``dataset_info.json`` there and
one counting pass over the shards (rank 0 counts, the other ranks get its result)."""

from __future__ import annotations

import glob
import io
import json
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from visionzoo.data.sources.class_folders import MANIFEST
from visionzoo.data.sources.shards import Shard, ShardStream, shard_error, warn
from visionzoo.data.sources.splits import Splits
from visionzoo.errors import UserError, first_line

if TYPE_CHECKING:
    from visionzoo.config import DataConfig

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTS = ("cls", "json")
VAL_NAMES = ("val", "validation", "test")
_READ_CHUNK = 1 << 20  # bytes per read from a URL: tarfile itself asks for 10 KiB at a time


def is_url(spec: str) -> bool:
    return "://" in spec


def _join(folder: str, name: str) -> str:
    """``name`` inside ``folder``, a URL or a local path."""
    return posixpath.join(folder, name) if is_url(folder) else os.path.join(folder, name)


def _missing_extra(what: str, extra: str) -> UserError:
    return UserError(f"{what} needs packages that are not installed: pip install 'visionzoo[{extra}]'")


def open_url(url: str, timeout: float) -> IO[bytes]:
    """A binary read stream of ``url`` through fsspec: a server that does not answer or stops
    sending for ``timeout`` seconds raises instead of hanging."""
    try:
        import fsspec
    except ImportError:
        raise _missing_extra(f"reading {url}", "shards") from None
    proto = url.split("://", 1)[0].lower()
    opts: dict = {}
    if proto in ("http", "https"):
        try:
            import aiohttp
        except ImportError:
            raise _missing_extra(f"reading {url}", "shards") from None
        # block_size 0: one streaming GET, no ranged requests.
        opts = {"block_size": 0, "client_kwargs": {"timeout": aiohttp.ClientTimeout(
            total=None, sock_connect=timeout, sock_read=timeout)}}
    elif proto in ("s3", "s3a"):
        opts = {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout}}
    try:
        return fsspec.open(url, "rb", **opts).open()
    except ImportError:
        raise _missing_extra(f"reading {proto}:// URLs", "s3" if proto.startswith("s3") else "shards") from None


class _Buffered(io.RawIOBase):
    """A raw reader over a file object, so ``io.BufferedReader`` can turn tarfile's small reads
    into few large ones (each read of a remote file is a round trip to fsspec's event loop)."""

    def __init__(self, f: IO[bytes]):
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:
        data = self.f.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.f.close()
        super().close()


def open_shard(name: str, timeout: float) -> IO[bytes]:
    """A buffered binary stream of a local shard file or a shard URL."""
    if not is_url(name):
        return open(name, "rb", buffering=_READ_CHUNK)
    return io.BufferedReader(_Buffered(open_url(name, timeout)), _READ_CHUNK)


def read_small(location: str, timeout: float) -> bytes | None:
    """The bytes of a small file (manifest, class list) beside the shards; None if absent."""
    if not is_url(location):
        return Path(location).read_bytes() if os.path.isfile(location) else None
    try:
        with open_url(location, timeout) as f:
            return f.read()
    except FileNotFoundError as err:
        # fsspec reports any failed HTTP request as FileNotFoundError: only a 404 (403 on S3) means absent.
        if err.__cause__ is None or getattr(err.__cause__, "status", None) in (403, 404):
            return None
        raise UserError(f"cannot read {location}: {shard_error(err)}") from None
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - fsspec and aiohttp raise many types
        raise UserError(f"cannot read {location}: {shard_error(err)}") from None


def parse_label(sample: dict) -> tuple[int | None, str | None]:
    """The label of a grouped tar sample: from ``.cls`` (text) or ``.json`` (a number, or an
    object with ``label``/``cls``); (None, why) when there is none or it is not an integer."""
    if "cls" in sample:
        raw = sample["cls"].decode("utf-8", "replace").strip()
        try:
            return int(raw), None
        except ValueError:
            return None, f"label {raw[:20]!r} in .cls is not an integer"
    if "json" in sample:
        try:
            obj = json.loads(sample["json"])
        except ValueError:
            return None, ".json is not valid JSON"
        value = obj.get("label", obj.get("cls")) if isinstance(obj, dict) else obj
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        return None, "no integer label in .json"
    return None, "no label (.cls or .json)"


class TarReader:
    """Reads the samples of a tar shard (a path or URL) with webdataset's streaming iterator."""

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout
        self.remote = False

    def read(self, shard: Shard, start: int) -> Iterator:
        from webdataset.tariterators import group_by_keys, tar_file_expander

        with open_shard(shard.name, self.timeout) as stream:
            files = tar_file_expander([{"url": shard.name, "stream": stream}])
            for index, sample in enumerate(group_by_keys(files)):
                if index < start:
                    continue
                key = f"{shard.name}:{sample['__key__']}"
                image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
                label, problem = parse_label(sample)
                if image is None:
                    problem = f"no image ({', '.join('.' + e for e in IMAGE_EXTS)})"
                yield key, image, label, problem


def count_tar(name: str, timeout: float) -> tuple[int, dict[int, int]]:
    """Samples in a tar shard and images per label, by reading it through (no manifest)."""
    reader, n, per_label = TarReader(timeout), 0, {}
    for _, _, label, problem in reader.read(Shard(name, 0), 0):
        n += 1
        if problem is None:
            per_label[label] = per_label.get(label, 0) + 1
    return n, per_label


# ------------------------------------------------------------------------------- finding shards
def expand(spec: str) -> list[str]:
    """Shard paths or URLs for a brace pattern, glob, folder of .tar files or single file."""
    from braceexpand import braceexpand

    if is_url(spec):
        if any(c in spec for c in "*?[") and not spec.lower().startswith(("http://", "https://")):
            import fsspec

            proto = spec.split("://", 1)[0]
            return [f"{proto}://{p}" for p in sorted(fsspec.filesystem(proto).glob(spec))]
        return list(braceexpand(spec))
    out: list[str] = []
    for item in braceexpand(os.path.expanduser(spec)):
        if any(c in item for c in "*?["):
            out += sorted(glob.glob(item))
        elif os.path.isdir(item):
            out += sorted(glob.glob(os.path.join(item, "*.tar")))
        else:
            out.append(item)
    return out


def _derive_val(train_spec: str) -> str | None:
    """The validation pattern of a training pattern: ``train`` → ``val`` in its file name."""
    head, tail = posixpath.split(train_spec)
    if "train" not in tail:
        return None
    return posixpath.join(head, tail.replace("train", "val"))


def split_specs(d: DataConfig, train: bool) -> tuple[str | None, str]:
    """(training pattern or None, validation pattern) from data.train / data.val / data.path."""
    train_spec, val_spec = d.train, d.val
    path = d.path
    if (train and train_spec is None) or val_spec is None:
        if not path:
            raise UserError("data.name=webdataset needs --data (a folder or pattern of .tar shards) "
                            "or data.train and data.val")
        folder = path.rstrip("/")
        local_dir = not is_url(path) and os.path.isdir(os.path.expanduser(path))
        if local_dir or (is_url(path) and not folder.endswith(".tar") and "{" not in folder):
            t_spec, v_spec = _folder_specs(folder, local_dir, d.io_timeout)
        else:
            t_spec, v_spec = path, _derive_val(path)
        train_spec = train_spec or t_spec
        val_spec = val_spec or v_spec
    if val_spec is None:
        raise UserError(f"cannot tell the validation shards of {path} (no 'train' in its file name): set data.val")
    return (train_spec if train else None), val_spec


def _folder_specs(folder: str, local: bool, timeout: float) -> tuple[str, str | None]:
    """Training and validation patterns of a shard folder: its manifest's shard lists, else
    train-*.tar / val-*.tar (or train/*.tar / val/*.tar) in it."""
    root = folder if not local else os.path.abspath(os.path.expanduser(folder))
    manifest = load_manifest(root, timeout)
    if manifest is not None and manifest.get("format", "webdataset") != "webdataset":
        fmt = manifest["format"]
        raise UserError(f"{folder} holds {fmt} shards (its {MANIFEST}): use data.name={fmt}")
    if manifest is not None:
        from visionzoo.data.sources.manifest import checked_splits

        splits = checked_splits(manifest, f"{folder}/{MANIFEST}")  # names inside the folder only
        join = posixpath.join if not local else os.path.join
        names = {s: [join(root, x["name"]) for x in shards] for s, shards in splits.items()}
        val = next((names[v] for v in VAL_NAMES if v in names), None)
        return _as_list_spec(names.get("train", [])), (_as_list_spec(val) if val else None)
    if not local:
        raise UserError(f"{folder}: no {MANIFEST} there; give the shards as a pattern "
                        f"(e.g. {folder}/train-{{000000..000099}}.tar) with data.train and data.val")
    for sub in ("train-*.tar", os.path.join("train", "*.tar")):
        if glob.glob(os.path.join(root, sub)):
            train_spec = os.path.join(root, sub)
            val_spec = next((os.path.join(root, sub.replace("train", v)) for v in VAL_NAMES
                             if glob.glob(os.path.join(root, sub.replace("train", v)))), None)
            return train_spec, val_spec
    raise UserError(f"{root} holds no train-*.tar or train/*.tar shards")


def _as_list_spec(names: list[str]) -> str:
    # A list of shards travels as one spec string: newline-separated (never in a path or URL).
    return "\n".join(names)


def shard_names(spec: str) -> list[str]:
    """The shards a spec names (a pattern, or newline-separated names from a manifest)."""
    names = spec.split("\n") if "\n" in spec else expand(spec)
    if not names:
        raise UserError(f"shard pattern {spec} matches no file")
    missing = [n for n in names if not is_url(n) and not os.path.isfile(n)]
    if missing:
        raise UserError(f"shard pattern {spec}: {len(missing)} of {len(names)} shard(s) missing, e.g. {missing[0]}")
    return names


# ------------------------------------------------------------------------- counts and classes
_manifests: dict[str, dict | None] = {}


def load_manifest(folder: str, timeout: float) -> dict | None:
    """``manifest.json`` of a shard folder (local or URL), or None."""
    if folder not in _manifests:
        raw = read_small(_join(folder, MANIFEST), timeout)
        try:
            _manifests[folder] = json.loads(raw) if raw is not None else None
        except ValueError as err:
            raise UserError(f"{folder}/{MANIFEST} is not valid JSON: {first_line(err)}") from None
    return _manifests[folder]


def _dirname(name: str) -> str:
    return posixpath.dirname(name) if is_url(name) else os.path.dirname(os.path.abspath(name))


def class_names_beside(folder: str, timeout: float) -> list[str] | None:
    """Class names from a manifest, classes.txt or a Hugging Face dataset_info.json in ``folder``."""
    join = posixpath.join if is_url(folder) else os.path.join
    manifest = load_manifest(folder, timeout)
    if manifest and manifest.get("classes"):
        return list(manifest["classes"])
    raw = read_small(join(folder, "classes.txt"), timeout)
    if raw is not None:
        return [ln.strip() for ln in raw.decode("utf-8").splitlines() if ln.strip()]
    raw = read_small(join(folder, "dataset_info.json"), timeout)
    if raw is not None:
        try:
            info = json.loads(raw)
            features = info.get("features", info.get("info", {}).get("features", {}))
            names = features.get("label", {}).get("names")
        except (ValueError, AttributeError):
            names = None
        if names:
            return list(names)
    return None


def counted_shards(names: list[str], timeout: float) -> tuple[list[Shard], dict[int, int]]:
    """Shards with their sample counts (manifest, else one counting pass, run on rank 0 only
    and shared) and images per label (only known from a counting pass)."""
    from visionzoo.data.sources.scan_cache import computed_once

    known: dict[str, int] = {}
    for folder in dict.fromkeys(_dirname(n) for n in names):
        manifest = load_manifest(folder, timeout)
        if manifest is None:
            continue
        from visionzoo.data.sources.manifest import checked_splits

        for split in checked_splits(manifest, f"{folder}/{MANIFEST}", ("name", "samples")).values():
            for s in split:
                known[_join(folder, s["name"])] = int(s["samples"])
    key = (lambda n: n) if names and is_url(names[0]) else os.path.abspath
    todo = [n for n in names if key(n) not in known]

    def count() -> dict:
        counts, labels = {}, {}
        for n in todo:
            try:
                counts[n], per = count_tar(n, timeout)
            except Exception as err:  # noqa: BLE001 - counted as a failed shard, as when training
                warn(f"shard {n}: {shard_error(err)}; left out")
                counts[n], per = 0, {}
            for k, v in per.items():
                labels[k] = labels.get(k, 0) + v
        return {"counts": counts, "labels": labels}

    per_label: dict[int, int] = {}
    if todo:
        warn(f"no {MANIFEST} beside {len(todo)} shard(s) (e.g. {todo[0]}): counting their samples by reading them once")
        result = computed_once(count)
        known.update({key(n): c for n, c in result["counts"].items()})
        per_label = {int(k): v for k, v in result["labels"].items()}
    return [Shard(n, known[key(n)]) for n in names], per_label


def _need_libs() -> None:
    try:
        import braceexpand  # noqa: F401
        import webdataset  # noqa: F401
    except ImportError:
        raise _missing_extra("data.name=webdataset", "shards") from None


def webdataset_splits(d: DataConfig, train: bool) -> Splits:
    """The reader of data.name=webdataset: train (when ``train``) and val ShardStreams and the
    class names; the loading layer sets the streams' transforms."""
    _need_libs()
    train_spec, val_spec = split_specs(d, train)
    val_names = shard_names(val_spec)
    train_names = shard_names(train_spec) if train_spec else []
    val_shards, val_labels = counted_shards(val_names, d.io_timeout)
    train_shards, train_labels = counted_shards(train_names, d.io_timeout) if train_names else ([], {})
    classes = class_names_beside(_dirname((train_names or val_names)[0]), d.io_timeout)
    if classes is None:
        labels = {**val_labels, **train_labels}
        if not labels or min(labels) < 0:
            raise UserError(f"no class names beside {(train_names or val_names)[0]} ({MANIFEST}, classes.txt or "
                            "dataset_info.json) and no labels to count them from")
        classes = [str(i) for i in range(max(labels) + 1)]
    reader = TarReader(d.io_timeout)
    reader.remote = is_url((train_names or val_names)[0])
    kw = dict(reader=reader, classes=classes, shuffle_buffer=d.shuffle_buffer, retries=d.io_retries)
    train_ds = ShardStream(train_shards, **kw) if train else None
    val_ds = ShardStream(val_shards, **kw)
    return Splits(train_ds, val_ds, classes)


def check_path(d: DataConfig) -> None:
    """Fail early (before workers are launched) on local shard patterns that match nothing."""
    _need_libs()
    train_spec, val_spec = split_specs(d, True)
    for spec in (train_spec, val_spec):
        if spec and not is_url(spec.split("\n")[0]):
            shard_names(spec)

