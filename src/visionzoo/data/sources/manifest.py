"""Checks of a shard folder's ``manifest.json`` (written by ``visionzoo data pack``) before any
name in it is opened: a hostile or damaged manifest gives one line naming the file, and shard
names are plain relative names, so nothing outside the folder is ever read."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from visionzoo.errors import UserError

SHARD_KEYS = {"name": str, "bytes": int, "sha256": str, "samples": int}


def safe_shard_name(name: Any) -> bool:
    """A name inside the folder: relative, no ``..``, no backslash, no drive or URL."""
    if not isinstance(name, str) or not name or "\\" in name or ":" in name or "\0" in name:
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts


def checked_splits(manifest: Any, where: str, keys: tuple[str, ...] = ("name",)) -> dict[str, list[dict]]:
    """``manifest["splits"]`` as {split: [shard entries]}, each entry holding ``keys`` with the
    right types and a safe name; a UserError naming ``where`` (the manifest's path) otherwise."""
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(splits, dict):
        raise UserError(f"{where} is not a visionzoo manifest (no 'splits' mapping)")
    out = {}
    for split, info in splits.items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            raise UserError(f"{where}: split '{split}' has no 'shards' list")
        for i, s in enumerate(shards):
            for key in keys:
                kind = SHARD_KEYS[key]
                value = s.get(key) if isinstance(s, dict) else None
                if not isinstance(value, kind) or isinstance(value, bool):
                    raise UserError(f"{where}: shard {i} of split '{split}' has no {kind.__name__} '{key}'")
            if not safe_shard_name(s["name"]):
                raise UserError(f"{where}: shard name {s['name']!r} of split '{split}' points outside the folder; "
                                f"shard names must be relative names inside it")
        out[split] = shards
    return out
