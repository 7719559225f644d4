"""The package's layers hold (import-linter's contracts in pyproject.toml, as `make test` runs
them), an import that points up a layer breaks them, and no function grows past what a reader
takes in at once (split it by what it does instead; ruff's argument-count and complexity rules,
run by `make test`, keep the rest small)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "visionzoo"
MAX_FUNCTION_LINES = 80
# The CLI's argument parser: one add_argument after another, read as a table of the flags.
LONG_ALLOWED = {"cli.py:build_parser"}


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


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """``file:function`` -> lines (from ``def`` to the last line of the body) of every function
    and method under ``root`` longer than ``limit`` lines, nested ones included."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found[f"{path.relative_to(root).as_posix()}:{node.name}"] = lines
    return found


def test_no_function_over_80_lines() -> None:
    long = {name: n for name, n in long_functions(SRC).items() if name not in LONG_ALLOWED}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them by what they do): {long}"


def test_a_long_function_is_found(tmp_path: Path) -> None:
    def function(name: str, lines: int, indent: str = "") -> str:  # the def line and lines - 1 of body
        return f"{indent}def {name}(self):\n" + "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 1))

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(function("fits", MAX_FUNCTION_LINES) + "\n\nclass C:\n"
                                           + function("too_long", MAX_FUNCTION_LINES + 1, "    "))
    assert long_functions(tmp_path) == {"pkg/m.py:too_long": MAX_FUNCTION_LINES + 1}
