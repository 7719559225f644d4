"""Every file a run writes gets the permissions the user's umask gives (results and checkpoints
as readable as config.yaml and metrics.jsonl), although each is written through a private
temporary file and renamed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from visionzoo.cli import main


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


def test_a_run_and_its_export_honour_the_umask(fmnist_dir, tmp_path, umask_022, capsys):
    run = tmp_path / "run"
    assert main(["train", "fashion_mnist", "--data", str(fmnist_dir), "--output", str(run), "--epochs", "1",
                 "--device", "cpu", "--workers", "0", "train.max_steps_per_epoch=3",
                 "train.checkpoint_every_steps=1"]) == 0
    assert main(["export", str(run)]) == 0
    modes = _modes(run)
    for name in ("results.json", "results.md", "status.json", "model.safetensors", "best.safetensors",
                 "config.yaml", "metrics.jsonl", "model.onnx", "model.json"):
        assert name in modes, sorted(modes)
    assert any(n.startswith("checkpoints/") and n.endswith(".pt") for n in modes)
    assert {n: m for n, m in modes.items() if m != 0o644} == {}
