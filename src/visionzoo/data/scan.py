"""``visionzoo data scan DIR``: images per class of an ImageFolder (or of each of its split
folders), the files that cannot be decoded and what the file-list cache (sources/scan_cache.py)
holds. A command module: the training path never imports it."""

from __future__ import annotations

import time
from pathlib import Path

from visionzoo.data.sources.folder import ImageFolderDataset, find_classes, load_image
from visionzoo.data.sources.scan_cache import cache_file
from visionzoo.errors import UserError
from visionzoo.runtime import default_signals


def _check_file(path: str) -> str | None:
    """Why ``path`` cannot be decoded, or None."""
    return None if load_image(path) is not None else "cannot be decoded"


def scan_report(root: str, check: bool = True, workers: int = 0) -> dict:
    """``visionzoo data scan DIR``: images per class of DIR (or of each split folder in it), the
    files that cannot be decoded (with ``check``) and the cache state; prints and returns it."""
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
            checked = zip(paths, results, strict=True)  # imap: one result per path
            for p, why in Progress(checked, len(paths), f"decode {desc}", leave=False):
                if why:
                    bad.append(p)
    else:
        for p in Progress(paths, len(paths), f"decode {desc}", leave=False):
            if _check_file(p):
                bad.append(p)
    return bad
