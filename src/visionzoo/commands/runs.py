"""Run management: what the run folders under a directory hold, and how two runs differ."""

from __future__ import annotations

import json
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from visionzoo.errors import UserError
from visionzoo.run_folder import format_table, pid_alive, read_metrics

DEFAULT_ROOT = "runs"  # where runs go without --output (report.new_run_dir)
RUN_COLUMNS = ("run", "recipe", "status", "epochs", "best Acc@1", "FPS", "started")


def run_status(run_dir: Path) -> str:
    """finished, running or failed. A run whose status says running but whose process is gone
    from this machine was killed (SIGKILL, power loss): it counts as failed."""
    if (run_dir / "results.json").is_file():
        return "finished"
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return "failed"
    if status.get("status") == "running" and status.get("host") == socket.gethostname():
        return "running" if pid_alive(int(status.get("pid", -1))) else "failed"
    return status.get("status", "failed")


def summarize(run_dir: Path) -> dict[str, Any]:
    """One row of ``visionzoo runs`` for a run folder."""
    row: dict[str, Any] = {"run": run_dir.name, "status": run_status(run_dir)}
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    row["recipe"] = cfg.get("recipe", "?")
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    epochs = [r for r in records if r.get("kind") == "epoch"]
    total = (cfg.get("train") or {}).get("epochs")
    row["epochs"] = f"{len(epochs)}/{total}" if total else str(len(epochs))
    accs = [r["acc1"] for r in epochs if r.get("acc1") is not None]
    row["best Acc@1"] = max(accs) if accs else None
    results = {}
    if (run_dir / "results.json").is_file():
        results = json.loads((run_dir / "results.json").read_text())
        if results.get("mode") == "perf":
            row["epochs"] = "perf"
    row["FPS"] = results.get("FPS")
    stamp = started(run_dir, records)
    row["started"] = datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M") if stamp else "-"
    return row


def started(run_dir: Path, records: list[dict] | None = None) -> float:
    """When a run started: its first metrics record, else when its config.yaml was written (a
    folder's own mtime changes with every file the run adds, so it is not used)."""
    if records is None:
        try:
            with open(run_dir / "metrics.jsonl") as f:
                first = f.readline()
            records = [json.loads(first)] if first.strip() else []
        except (OSError, ValueError):
            records = []
    stamp = records[0].get("time") if records else None
    return stamp if isinstance(stamp, (int, float)) else (run_dir / "config.yaml").stat().st_mtime


def is_run(path: Path) -> bool:
    """Whether ``path`` is a run folder (every run writes its config.yaml first)."""
    return (Path(path) / "config.yaml").is_file()


def list_runs(root: str | Path) -> list[dict[str, Any]]:
    """Rows for every run folder directly under ``root``, oldest first; ``root`` itself when it
    is a run folder."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"no runs folder at {root}")
    if is_run(root):
        return [summarize(root)]
    dirs = sorted((d for d in root.iterdir() if is_run(d)), key=started)
    return [summarize(d) for d in dirs]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def compare(a: str | Path, b: str | Path) -> tuple[list[tuple[str, Any, Any]], list[dict[str, Any]]]:
    """The config keys whose values differ between two runs (key, value in a, value in b),
    and the two runs' summary rows."""
    flat = []
    for run in (Path(a), Path(b)):
        if not is_run(run):
            raise UserError(f"{run} is not a run folder (no config.yaml)")
        flat.append(_flatten(yaml.safe_load((run / "config.yaml").read_text())))
    keys = sorted(set(flat[0]) | set(flat[1]))
    ignore = {"output"}  # always differs, says nothing about the runs
    diffs = [(k, flat[0].get(k), flat[1].get(k)) for k in keys if k not in ignore and flat[0].get(k) != flat[1].get(k)]
    return diffs, [summarize(Path(a)), summarize(Path(b))]


def print_runs(root: str | Path) -> None:
    """``visionzoo runs [DIR]``: one row per run under DIR; for a run folder, its row and its
    results row."""
    if str(root) == DEFAULT_ROOT and not Path(root).exists():  # `visionzoo runs` before any training
        print(f"no runs yet: ./{DEFAULT_ROOT} does not exist. Train one with `visionzoo train fashion_mnist` "
              f"(or `make demo`), or pass the folder that holds your runs: visionzoo runs DIR")
        return
    rows = list_runs(root)
    print(format_table(rows, RUN_COLUMNS) if rows else f"no runs under {root}")
    results = Path(root) / "results.json"
    if is_run(Path(root)) and results.is_file():
        print()
        print(format_table([json.loads(results.read_text())]))


def print_compare(a: str | Path, b: str | Path) -> None:
    """``visionzoo runs --compare A B``."""
    diffs, rows = compare(a, b)
    name_a, name_b = Path(a).name, Path(b).name
    # Config values print as written (format_table would round floats such as learning rates).
    print(format_table([{"key": k, name_a: repr(va) if isinstance(va, str) else str(va),
                         name_b: repr(vb) if isinstance(vb, str) else str(vb)} for k, va, vb in diffs],
                       ("key", name_a, name_b))
          if diffs else "the two runs have the same config")
    print()
    print(format_table(rows, RUN_COLUMNS))
