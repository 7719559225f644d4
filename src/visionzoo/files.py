"""Writing a run's files: each one atomically (a crash leaves the old file or the new one, never
half of one) and with the permissions the user's umask gives new files, as ``open()`` would.

Kept free of torch, so the commands that only write or read text start in a fraction of a second."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync, and rename over ``path``.

    mkstemp creates the temporary file 0600; it gets 0666 minus the umask before the rename, so
    results and checkpoints are as readable as config.yaml and metrics.jsonl (teammates on a
    shared cluster read them)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomically (see atomic_write)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
