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

``visionzoo data scan DIR`` (``scan_report``) prints images per class, unreadable files and
what the cache holds."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from visionzoo.errors import UserError
from visionzoo.runtime import default_signals

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
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise UserError(value)
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


# ------------------------------------------------------------------------------- data scan
def _check_file(path: str) -> str | None:
    """Why ``path`` cannot be decoded, or None."""
    from visionzoo.data.folder import load_image

    return None if load_image(path) is not None else "cannot be decoded"


def scan_report(root: str, check: bool = True, workers: int = 0) -> dict:
    """``visionzoo data scan DIR``: images per class of DIR (or of each split folder in it), the
    files that cannot be decoded (with ``check``) and the cache state; prints and returns it."""
    from visionzoo.data.folder import ImageFolderDataset, find_classes

    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserError(f"not a folder: {base}")
    splits = [base / s for s in ("train", "val", "validation", "test") if (base / s).is_dir()] or [base]
    report: dict = {"root": str(base), "splits": {}}
    for folder in splits:
        t0 = time.perf_counter()
        ds = ImageFolderDataset(folder, find_classes(folder))
        seconds = time.perf_counter() - t0
        per_class = {c: 0 for c in ds.classes}
        for _, t in ds.samples:
            per_class[ds.classes[t]] += 1
        bad: list[str] = []
        if check:
            bad = _unreadable([p for p, _ in ds.samples], workers, folder.name)
        counts = list(per_class.values())
        entry = {"images": len(ds.samples), "classes": len(ds.classes), "per_class": per_class,
                 "min_per_class": min(counts), "max_per_class": max(counts), "empty_classes": ds.empty_classes,
                 "unreadable": bad if check else None, "list": ds.scan_state, "list_seconds": round(seconds, 3),
                 "cache_file": str(cache_file(folder))}
        report["splits"][folder.name] = entry
        print(f"{folder}: {entry['images']} images in {entry['classes']} classes "
              f"({entry['min_per_class']}-{entry['max_per_class']} per class"
              + (f", {len(ds.empty_classes)} empty" if ds.empty_classes else "") + ")"
              + (f"; {len(bad)} unreadable" if check else "; not decoded (--no-check)")
              + f"; file list {ds.scan_state} in {seconds:.2f} s (cache {cache_file(folder)})")
        for p in bad[:20]:
            print(f"  unreadable: {p}")
        if len(bad) > 20:
            print(f"  ... and {len(bad) - 20} more")
    return report


def _unreadable(paths: list[str], workers: int, desc: str) -> list[str]:
    from visionzoo.progress import Progress

    bad: list[str] = []
    if workers > 1:
        from multiprocessing import Pool

        with Pool(workers, initializer=default_signals) as pool:
            results = pool.imap(_check_file, paths, chunksize=64)
            for p, why in Progress(zip(paths, results), len(paths), f"decode {desc}", leave=False):
                if why:
                    bad.append(p)
    else:
        for p in Progress(paths, len(paths), f"decode {desc}", leave=False):
            if _check_file(p):
                bad.append(p)
    return bad
