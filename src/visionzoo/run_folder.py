"""What a run leaves behind: its folder, metrics.jsonl, results.json and the seed-style table."""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from visionzoo.files import atomic_write

# The columns of the seeds' results tables, in their order.
TABLE_COLUMNS = ("recipe", "Acc@1", "FPS", "devices", "BN group", "epochs", "precision", "torch")


def new_run_dir(recipe: str, output: str | None, root: str = "runs") -> Path:
    """``output`` if given, else ``runs/<recipe>-<YYYYmmdd-HHMMSS>`` (made unique). An existing
    ``output`` folder (an attempt that died before its first checkpoint) loses its old metrics,
    so the new run's metrics.jsonl starts empty."""
    if output:
        path = Path(output).expanduser()
        (path / "metrics.jsonl").unlink(missing_ok=True)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(root) / f"{recipe}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = Path(root) / f"{recipe}-{stamp}-{n}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def last_step(path: Path) -> int:
    """The largest optimizer step a metrics.jsonl records (0 for none; a line cut short by a
    kill is passed over)."""
    steps = []
    for line in Path(path).read_text().splitlines():
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        steps += [step] if isinstance(step, int) else []
    return max(steps, default=0)


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl; every record gets a wall-clock time.

    Opened on a metrics.jsonl that already has records (a resumed run: engine/resume.py has cut
    it back to the checkpoint), it first records where this session starts: ``{"kind": "resume",
    "step": S}`` with S the checkpoint's step (``resumed_at``) or, when not given, the last step
    the file records. curves.png marks each one.

    With ``tensorboard_dir`` the same numbers also go to TensorBoard, tagged ``<kind>/<key>``
    and stepped by optimizer step (step records) or epoch (epoch records)."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, resumed_at: int | None = None):
        self.path = Path(path)
        continues = self.path.is_file() and self.path.stat().st_size > 0
        start = (resumed_at if resumed_at is not None else last_step(self.path)) if continues else None
        self._f = open(self.path, "a", buffering=1)
        self._tb = None
        self.trackers: list = []  # trackers.py: MLflow, W&B (rank 0), fed every record
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("warning: log.tensorboard=true but the tensorboard package is not installed "
                      "(pip install tensorboard); writing metrics.jsonl only", flush=True)
            else:
                self._tb = SummaryWriter(str(tensorboard_dir))
        if start is not None:
            self.write(kind="resume", step=start)

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 3))
        self._f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            kind = record.get("kind", "misc")
            step = record.get("step" if kind == "step" else "epoch", 0)
            for key, value in record.items():
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if number and key not in ("time", "step", "epoch"):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()

    def finish(self, run_dir: Path, results: dict | None, status: str) -> None:
        """End the trackers' runs (FINISHED, FAILED or KILLED), sending results and files."""
        for tracker in self.trackers:
            tracker.finish(run_dir, results, status)
        self.trackers = []


def mark_status(run_dir: Path, status: str, **extra: Any) -> None:
    """Record a run's state in status.json: running (with pid and host), finished or failed."""
    record = {"status": status, "pid": os.getpid(), "host": socket.gethostname(),
              "time": datetime.now().isoformat(timespec="seconds"), **extra}
    atomic_write(Path(run_dir) / "status.json", lambda tmp: Path(tmp).write_text(json.dumps(record) + "\n"))


LOCK = ".lock"  # held (flock) by the process training the run, for as long as it trains


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0
    return True


class RunLock:
    """An exclusive lock on a run folder while a process trains it: a second job (a Slurm array
    task, a restarted script) cannot train the same folder at once. The operating system drops
    the lock when the process ends, however it ends, so a killed run never leaves a stale one.
    Where ``fcntl`` is missing (Windows) only status.json tells."""

    def __init__(self, run_dir: Path) -> None:
        self.path, self._fd = Path(run_dir) / LOCK, None

    def acquire(self) -> bool:
        """Take the lock; False if another process holds it."""
        try:
            import fcntl
        except ImportError:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def live_owner(run_dir: Path) -> str | None:
    """Who trains ``run_dir`` right now ("pid N on HOST"), or None: its lock is held by another
    process, or status.json says running with a live pid on this machine (not this process)."""
    try:
        status = json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        status = {}
    who = f"pid {status.get('pid', '?')} on {status.get('host', '?')}"
    if (Path(run_dir) / LOCK).exists():
        lock = RunLock(run_dir)
        if not lock.acquire():
            return who
        lock.release()
    if status.get("status") == "running" and status.get("host") == socket.gethostname():
        pid = int(status.get("pid", -1))
        if pid != os.getpid() and pid_alive(pid):
            return who
    return None


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def format_table(rows: list[dict], columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    """A Markdown table, the form the seeds' READMEs use."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(run_dir: Path, results: dict) -> str:
    """Save results.json and results.md (the table row); return the table text."""
    table = format_table([results])
    atomic_write(run_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2) + "\n"))
    atomic_write(run_dir / "results.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    return table


def report_fallbacks(n: int | None) -> None:
    """Say how many images data.decode=device had to decode on the CPU (they slow the batch)."""
    if n:
        print(f"note: {n} image(s) were not JPEGs the device decoder takes (PNG, CMYK, ...) and were "
              f"decoded by Pillow on the CPU", flush=True)
