"""The package's layers hold (import-linter's contracts in pyproject.toml, as `make test` runs
them), an import that points up a layer breaks them, and no source file grows past what a reader
takes in at once (split a file by what it holds instead)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "visionzoo"
MAX_LINES = 500


def _lint(src_root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    env = {"PYTHONPATH": str(src_root), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run([exe, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=src_root,
                          env=env, capture_output=True, text=True, timeout=120)


def test_layers_hold() -> None:
    proc = _lint(ROOT / "src")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize("module, upward", [
    ("data/sources/idx.py", "from visionzoo.data.loading import build"),  # sources -> loading
    ("data/augment/mix.py", "from visionzoo.data.loading import samplers"),  # augment -> loading
    ("models/small_cnn.py", "from visionzoo.engine import run"),  # models -> engine
    ("config.py", "from visionzoo import checkpoint"),  # config -> a layer above it
])
def test_an_upward_import_fails(tmp_path: Path, module: str, upward: str) -> None:
    copy = tmp_path / "src" / "visionzoo"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / module, "a") as f:
        f.write(f"\n{upward}  # the upward import\n")
    proc = _lint(tmp_path / "src")
    assert proc.returncode != 0
    imported = upward.split()[1] + "." + upward.split()[3] if upward.startswith("from") else upward.split()[1]
    assert "BROKEN" in proc.stdout and imported in proc.stdout, proc.stdout


def test_no_source_file_over_500_lines() -> None:
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by what they hold): {long}"
