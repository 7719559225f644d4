"""benchmarks/gpu_check.py, the GPU self-check: its dry run (every check on the CPU, tiny sizes)
passes in CI, its sync counting and its missing-package message work without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CUDA_ONLY = {"host syncs", "deterministic, fresh process"}  # SKIP on the CPU


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_passes_every_check(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(SCRIPT), "--dry-run", "--output", str(out), "--workdir", str(tmp_path / "w")]
    proc = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["verdict"] == "PASS" and report["dry_run"] is True and report["device"] == "cpu"
    status = {(c["recipe"], c["check"]): c["status"] for c in report["checks"]}
    module = _module()
    for recipe in module.RECIPES:
        checks = {check for r, check in status if r == recipe}
        trains = {c for c in checks if c.startswith("train ")}
        assert {"eval", "export onnx", "resume", "host syncs"} <= checks, recipe
        assert {t.split()[1] for t in trains} == {"fp32", "bf16", "fp16"}, recipe
        if recipe != "resnet50_cifar100":  # ImageFolder recipes: both data paths
            assert any("decode=cpu" in t for t in trains) and any("decode=device" in t for t in trains), recipe
    assert ("alexnet_imagenet", "train bf16 compile (decode=device)") in status
    for (recipe, check), st in status.items():
        assert st == ("SKIP" if check in CUDA_ONLY else "PASS"), (recipe, check, st)
    # One table on stdout, a row per check.
    for (recipe, check), st in status.items():
        assert f"| {recipe} | {check} | {st} |" in proc.stdout
    assert "gpu_check: PASS" in proc.stdout


def test_syncs_per_step_cancel_what_every_run_shares(monkeypatch):
    """The counting a GPU does, fed with warnings as torch.cuda.set_sync_debug_mode("warn") gives
    them: two syncs per run (epoch end) and one per step -> 1 per step, at the per-step place."""
    import torch

    module = _module()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def run(n: int) -> None:  # stacklevel 1: each warning's place is its own line
        for _ in range(n):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # the per-step place
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        warnings.warn("something else", stacklevel=1)

    rate, places = module._per_step(run, 3, "cuda:0", True)
    assert rate == 1.0
    assert list(places.values()) == [3] and next(iter(places)).startswith("test_gpu_check.py:")
    assert modes == ["warn", "default", "warn", "default"]


def test_missing_packages_are_named_with_a_way_to_bring_them(monkeypatch, capsys):
    module = _module()
    real = importlib.util.find_spec
    monkeypatch.setattr(module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "omegaconf" else real(name, *a))
    assert module.main(["--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "missing Python package(s): omegaconf" in err and "src/visionzoo/config.py" in err
    assert "pip download omegaconf -d wheels" in err and "--no-index" in err


@pytest.mark.parametrize("argv", [["--dry-run", "--device", "cuda"], ["--device", "cpu"],
                                  ["--dry-run", "--recipes", "lenet"]])
def test_bad_arguments_stop_before_any_work(argv, capsys, monkeypatch):
    import torch

    import visionzoo.engine.run

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # main sets it: recorded, so undone afterwards
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    compile_, plot = torch.compile, visionzoo.engine.run.plot_curves
    assert _module().main(argv) == 2
    assert "gpu_check:" in capsys.readouterr().err
    assert (torch.compile, visionzoo.engine.run.plot_curves) == (compile_, plot)  # no dry-run shortcut left


def test_dry_run_shortcuts_are_undone():
    import torch

    import visionzoo.engine.run

    before = torch.compile, visionzoo.engine.run.plot_curves
    with _module().dry_run_shortcuts(True):
        assert torch.compile is not before[0] and visionzoo.engine.run.plot_curves is not before[1]
    assert (torch.compile, visionzoo.engine.run.plot_curves) == before
