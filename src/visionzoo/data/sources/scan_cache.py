"""The ImageFolder file list, scanned once and cached, and shared by all ranks.

Walking a 1.28M-file tree costs minutes on network file systems, and every rank of every start
used to do it. Now rank 0 alone scans (or reads the cache) and hands the list to the other
ranks over the process group, so no shared cache folder is needed between machines.

The cache is one JSON file per folder under ``$VISIONZOO_CACHE`` (default
``$XDG_CACHE_HOME/visionzoo`` or ``~/.cache/visionzoo``), ``scans/<hash of the real path>.json``.
It records the modification time of every folder the scan walked: adding, removing or renaming
a file changes its folder's mtime, so a cache is used only while none of them changed (one
``stat`` per folder, ~1000 for ImageNet). Editing a file in place does not change the list and
does not invalidate it; a sub-folder that held no image when scanned is not watched.

``visionzoo data scan DIR`` (data/scan.py) prints images per class, unreadable files and what the
cache holds."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from visionzoo.distributed import raise_agreed
from visionzoo.errors import UserError

VERSION = 1


def cache_dir() -> Path:
    """Where visionzoo keeps caches ($VISIONZOO_CACHE, else $XDG_CACHE_HOME/visionzoo)."""
    if os.environ.get("VISIONZOO_CACHE"):
        return Path(os.environ["VISIONZOO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "visionzoo"


def computed_once(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 only and its result handed to every rank (just ``fn()`` without a
    process group). A UserError on rank 0 is raised on every rank, so none waits forever."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except UserError as err:
            box[0] = ("error", str(err))
        except Exception as err:
            box[0] = ("error", f"rank 0 failed: {type(err).__name__}: {err}")
            dist.broadcast_object_list(box, src=0)
            dist.barrier()  # the other ranks' raise_agreed
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise_agreed(value)
    return value


def cache_file(root: str | Path) -> Path:
    real = os.path.realpath(root)
    return cache_dir() / "scans" / f"{hashlib.sha256(real.encode()).hexdigest()[:24]}.json"


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _load(root: str, names: list[str], extensions: list[str]) -> dict[str, list[str]] | None:
    path = cache_file(root)
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (cached.get("version") != VERSION or cached.get("root") != os.path.realpath(root)
            or cached.get("extensions") != extensions or not set(names) <= set(cached.get("classes", {}))):
        return None
    for rel, mtime in cached["dirs"].items():
        if _mtime(os.path.join(root, rel)) != mtime:
            return None
    return {n: cached["classes"][n] for n in names}


def _store(root: str, lists: dict[str, list[str]], dirs: dict[str, int], extensions: list[str]) -> None:
    path = cache_file(root)
    data = {"version": VERSION, "root": os.path.realpath(root), "extensions": extensions, "dirs": dirs,
            "classes": lists}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, separators=(",", ":")))
        os.replace(tmp, path)
    except OSError as err:
        print(f"visionzoo: warning: cannot write the scan cache {path}: {err}", file=sys.stderr)


def scan_classes(root: str | Path, names: list[str], scan_one: Callable[[str, list[str]], list[str]],
                 extensions: list[str], use_cache: bool = True) -> tuple[dict[str, list[str]], str]:
    """The image paths of each class folder ``root/<name>`` (``scan_one(folder, walked_dirs)``
    lists one and appends the folders it walked), from the cache when it is still valid; rank 0
    does the work for every rank. Returns the lists and "cached", "scanned" or "scanned (cache off)"."""
    root = str(root)

    def work() -> tuple[dict[str, list[str]], str]:
        if use_cache:
            hit = _load(root, names, extensions)
            if hit is not None:
                return hit, "cached"
        started = time.time_ns()
        dirs = {".": _mtime(root)}
        lists: dict[str, list[str]] = {}
        for name in names:
            walked: list[str] = []
            paths = scan_one(os.path.join(root, name), walked)
            for d in walked:
                dirs[os.path.relpath(d, root)] = _mtime(d)
            lists[name] = [os.path.relpath(p, root) for p in paths]
        # A folder changed while it was being walked may have been listed before the change.
        if use_cache and all(m is not None and m < started for m in dirs.values()):
            _store(root, lists, dirs, extensions)
        return lists, "scanned" if use_cache else "scanned (cache off)"

    rel, how = computed_once(work)
    return {n: [os.path.join(root, p) for p in ps] for n, ps in rel.items()}, how
